"""The per-instruction cost-model report (vimpac_jax/aot/hlo_cycles.py) on a hand-made module
in the text format of a compiled TPU program (no libtpu needed)."""

import pytest

from vimpac_jax.aot import hlo_cycles

# The shape of libtpu's printout: a fused computation (its instructions must not be counted),
# then ENTRY with a tuple-shaped ROOT, a custom-call without an estimate, two layers' fusions.
HLO = '''HloModule jit_train_step, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%fused_computation (param_0: f32[8,128]) -> f32[8,128] {
  %param_0 = f32[8,128]{1,0} parameter(0)
  ROOT %multiply.1 = f32[8,128]{1,0} multiply(%param_0, %param_0), backend_config={"estimated_cycles":"999999"}
}

%cond.1 (arg.1: (s32[], f32[8,128])) -> pred[] {
  %arg.1 = (s32[]{:T(128)}, f32[8,128]{1,0}) parameter(0)
  %gte.1 = s32[]{:T(128)} get-tuple-element(%arg.1), index=0
  %constant.3 = s32[]{:T(128)} constant(3)
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte.1, %constant.3), direction=LT, metadata={op_name="jit(train_step)/while/cond/lt"}, backend_config={"estimated_cycles":"1"}
}

%body.1 (arg.2: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %arg.2 = (s32[]{:T(128)}, f32[8,128]{1,0}) parameter(0)
  ROOT %fusion.9 = (s32[]{:T(128)}, f32[8,128]{1,0}) fusion(%arg.2), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(train_step)/while/body/closed_call/jvp(VideoTransformer)/backbone/layer_2/mlp/dot_general"}, backend_config={"estimated_cycles":"1000"}
}

ENTRY %main.10 (Arg_0.1: f32[8,128]) -> (f32[8,128], u32[2]) {
  %Arg_0.1 = f32[8,128]{1,0:T(8,128)} parameter(0), metadata={op_name="x"}
  %fusion.1 = f32[8,128]{1,0:T(8,128)(2,1)} fusion(%Arg_0.1), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(train_step)/jvp(VideoTransformer)/backbone/layer_0/attn_0/dot_general" source_file="a.py" source_line=3}, backend_config={"flag_configs":[],"estimated_cycles":"300","used_scoped_memory_configs":[]}
  %fusion.2 = f32[8,128]{1,0:T(8,128)(2,1)} fusion(%fusion.1), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(train_step)/jvp(VideoTransformer)/backbone/layer_11/attn_0/dot_general"}, backend_config={"flag_configs":[],"estimated_cycles":"200"}
  %copy.3 = f32[8,128]{0,1:T(8,128)} copy(%fusion.2), metadata={op_name="jit(train_step)/transpose(jvp(VideoTransformer))/head/transpose"}, backend_config={"estimated_cycles":"100"}
  %custom-call.4 = u32[2]{0} custom-call(%Arg_0.1), custom_call_target="X64Combine"
  %tuple.6 = (s32[], f32[8,128]{1,0}) tuple(%constant.0, %copy.3)
  %while.7 = (s32[], f32[8,128]{1,0}) while(%tuple.6), condition=%cond.1, body=%body.1, metadata={op_name="jit(train_step)/while"}
  ROOT %tuple.5 = (f32[8,128]{1,0}, u32[2]{0}) tuple(%copy.3, %custom-call.4)
}
'''


def test_entry_instructions_only_the_entry():
    insts = hlo_cycles.entry_instructions(HLO)
    assert [i.name for i in insts] == ["Arg_0.1", "fusion.1", "fusion.2", "copy.3", "custom-call.4", "tuple.6",
                                       "while.7", "tuple.5"]
    assert [i.opcode for i in insts] == ["parameter", "fusion:kLoop", "fusion:kOutput", "copy", "custom-call", "tuple",
                                         "while", "tuple"]
    assert insts[1].estimated_cycles == 300 and insts[4].estimated_cycles is None
    assert insts[6].called == (("condition", "cond.1"), ("body", "body.1"))


def test_cycle_report_sums_loops_and_folds_layers():
    report = hlo_cycles.cycle_report(HLO, depth=4)
    # The entry's 600 and the loop's body (1000) and condition (1) three times; the fused
    # computation's 999999 is not counted (its fusion's estimate covers it).
    assert report.total_cycles == 600 + 3 * 1001
    assert report.loops == [("while.7", 3)] and report.unknown_loops == 0
    assert report.num_estimated == 5
    assert report.without_estimate == {"parameter": 3, "custom-call": 1, "tuple": 2, "get-tuple-element": 1,
                                       "constant": 1}
    # layer_0, layer_2 (in the loop) and layer_11 are one group; jit(...) and the scan's wrappers dropped
    assert report.by_source == [("jvp(VideoTransformer)/backbone/layer_*/mlp", 3000),
                                ("jvp(VideoTransformer)/backbone/layer_*/attn_0", 500),
                                ("transpose(jvp(VideoTransformer))/head/transpose", 100), ("lt", 3)]
    assert dict(report.by_opcode) == {"fusion:kLoop": 3300, "fusion:kOutput": 200, "copy": 100, "compare": 3}
    assert report.seconds(1e9) == pytest.approx(3603e-9)
    text = hlo_cycles.format_report(report, top=1, clock_hz=1e9)
    assert "total 3,603 cycles" in text and "loops: while.7 x3" in text and "83.26%" in text
    assert "head/transpose" not in text


def test_loop_of_unknown_trip_count_is_left_out_and_said():
    report = hlo_cycles.cycle_report(HLO.replace("direction=LT", "direction=NE"))
    assert report.total_cycles == 600 and report.unknown_loops == 1
    assert "1 of unknown trip count left out (a lower bound)" in hlo_cycles.format_report(report)


def test_not_an_hlo_module():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo_cycles.entry_instructions("HloModule m\n")


# Two Pallas kernels as libtpu prints them (backend config cut to what is read): one with the
# cost_estimate Pallas serialises from pl.CostEstimate, one without (its bytes from its shapes);
# the second inside the loop's body, run 3 times.
PALLAS = '''  %line_attention_fwd.1 = bf16[2,4,128]{2,1,0:T(8,128)(2,1)} custom-call(%Arg_0.1, %Arg_0.1), custom_call_target="tpu_custom_call", operand_layout_constraints={bf16[2,4,128]{2,1,0}, s8[2,1,128]{2,1,0}}, metadata={op_name="jit(train_step)/jvp(VideoTransformer)/backbone/layer_0/attn_0/cond/branch_0_fun/line_attention_fwd/pallas_call"}, backend_config={"flag_configs":[],"custom_call_config":{"body":"TUxJUh","cost_estimate":{"flops":"91800000000","transcendentals":"7","bytes_accessed":"5530000000","remote_bytes_transferred":"0"},"needs_layout_passes":true}}
'''
PALLAS_IN_LOOP = '''  %kernel.2 = (f32[8,128]{1,0}, f32[4]{0}) custom-call(%arg.2), custom_call_target="tpu_custom_call", operand_layout_constraints={bf16[8,128]{1,0}}, metadata={op_name="jit(train_step)/while/body/closed_call/transpose(jvp(VideoTransformer))/backbone/layer_1/attn_1/k"}, backend_config={"custom_call_config":{"body":"TUxJUh"}}
'''


def test_pallas_kernels_charged_at_twice_their_roofline():
    from vimpac_jax.aot import chips

    hlo = HLO.replace("  %custom-call.4", PALLAS + "  %custom-call.4").replace(
        "  ROOT %fusion.9", PALLAS_IN_LOOP + "  ROOT %fusion.9")
    kernel = next(i for i in hlo_cycles.entry_instructions(hlo) if i.name == "line_attention_fwd.1").kernel
    assert kernel == hlo_cycles.KernelCost(91_800_000_000, 5_530_000_000, "cost_estimate")
    # Without a chip the kernels are custom-calls without an estimate, as before.
    plain = hlo_cycles.cycle_report(hlo)
    assert plain.total_cycles == 600 + 3 * 1001 and plain.pallas_kernels == 0
    assert plain.without_estimate["custom-call"] == 3
    v5p = chips.GENERATIONS["v5p"]  # 459 TFLOP/s, 2,765 GB/s, clock 1.7509 GHz
    report = hlo_cycles.cycle_report(hlo, depth=4, chip=v5p)
    # The first: 91.8 GFLOP / 459 TFLOP/s = 0.2 ms, 5.53 GB / 2,765 GB/s = 2.0 ms: the bytes bound
    # it; x 2, at the clock.
    first = round(2 * max(91.8e9 / 459e12, 5.53e9 / 2765e9) * v5p.clock_hz)
    assert first == round(2 * 2.0e-3 * v5p.clock_hz)
    # The second has no cost_estimate: its result and operand bytes, no FLOPs; 3 trips.
    second_bytes = 8 * 128 * 4 + 4 * 4 + 8 * 128 * 2
    second = round(2 * second_bytes / 2765e9 * v5p.clock_hz)
    assert report.pallas_kernels == 2 and report.pallas_sources == ("cost_estimate", "shapes")
    assert report.pallas_cycles == first + 3 * second
    assert report.total_cycles == 600 + 3 * 1001 + first + 3 * second
    assert report.estimated_cycles == 600 + 3 * 1001
    assert report.without_estimate["custom-call"] == 1  # X64Combine only
    assert dict(report.by_source)["jvp(VideoTransformer)/backbone/layer_*/attn_0 [Pallas, charged]"] == first
    text = hlo_cycles.format_report(report)
    assert f"Pallas kernels charged at 2x roofline (not timed on a chip): {first + 3 * second:,d} cycles" in text
