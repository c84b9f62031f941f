"""vimpac-jax: VIMPAC video pre-training (masked token prediction + contrastive) in JAX/Flax."""

__version__ = "0.1.0"


def load_classifier(workdir, **kwargs):
    """A fine-tuned classifier for video files: `vimpac_jax.predict.load_classifier` (see there).

    clf = vimpac_jax.load_classifier("runs/ucf_small"); clf.predict("video.mp4") -> [(class, prob), ...]
    (Imported on call: this package must stay importable without JAX, see data/video_decode.py.)
    """
    from vimpac_jax.predict import load_classifier as load

    return load(workdir, **kwargs)
