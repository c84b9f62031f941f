"""Frames of many videos packed into full device batches (`vimpac tokenize`, `vimpac predict`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np


class FrameBatcher:
    """Packs the frames of many videos into full device batches and hands back each video's tokens
    once all its frames have come back.

    encode_async(frames uint8 [B, S, S, 3]) must return an object whose .result() gives int [B, h, w]
    (`Tokenizer.encode_tokens_async`). Up to `depth` batches are in flight: the host cuts the next
    batch while the devices run the previous one. A video may span batches.
    """

    def __init__(self, encode_async: Callable[[np.ndarray], Any], batch_size: int, token_hw: tuple[int, int],
                 depth: int = 2):
        self.encode_async = encode_async
        self.batch_size = batch_size
        self.token_hw = token_hw
        self.depth = depth
        self._queue: deque[list] = deque()  # [key, frames, next row to send]
        self._queued = 0
        self._inflight: deque[tuple[Any, list[tuple[Any, int, int]]]] = deque()
        self._outputs: dict[Any, list] = {}  # key -> [int16 tokens [F, h, w], rows still missing]

    def add(self, key, frames: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        """Queue one video's frames [F, S, S, 3]; returns the videos finished meanwhile: [(key, tokens int16 [F, h, w])]."""
        n = len(frames)
        self._outputs[key] = [np.empty((n, *self.token_hw), np.int16), n]
        if n == 0:
            return [(key, self._outputs.pop(key)[0])]
        self._queue.append([key, frames, 0])
        self._queued += n
        done = []
        while self._queued >= self.batch_size:
            done += self._dispatch(self.batch_size)
        return done

    def flush(self) -> list[tuple[Any, np.ndarray]]:
        """Send the last, short batch and wait for everything."""
        done = self._dispatch(self._queued) if self._queued else []
        while self._inflight:
            done += self._retire()
        return done

    def _dispatch(self, n: int) -> list[tuple[Any, np.ndarray]]:
        parts, segments = [], []
        while n > 0:
            entry = self._queue[0]
            key, frames, start = entry
            take = min(n, len(frames) - start)
            parts.append(frames[start:start + take])
            segments.append((key, start, take))
            entry[2] += take
            n -= take
            self._queued -= take
            if entry[2] == len(frames):
                self._queue.popleft()
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._inflight.append((self.encode_async(batch), segments))
        done = []
        while len(self._inflight) > self.depth:
            done += self._retire()
        return done

    def _retire(self) -> list[tuple[Any, np.ndarray]]:
        pending, segments = self._inflight.popleft()
        tokens = pending.result()
        done, offset = [], 0
        for key, start, count in segments:
            out = self._outputs[key]
            out[0][start:start + count] = tokens[offset:offset + count]
            offset += count
            out[1] -= count
            if out[1] == 0:
                done.append((key, self._outputs.pop(key)[0]))
        return done
