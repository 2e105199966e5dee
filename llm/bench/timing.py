"""Timing helpers of the benchmarks: repeated calls after a compile, and calls timed in turn
(ratios of medians of calls made seconds apart, since a shared machine's speed drifts)."""

import time

import jax
import numpy as np



def times(fn, repeats) -> list[float]:
  """The seconds of each of `repeats` calls of fn, its results awaited, after one that
  compiles."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def best_time(fn, repeats):
  return min(times(fn, repeats))


def in_turn(calls: dict, rounds: int) -> dict:
  """The median seconds of each of `calls` (name: a function that returns when its work is
  done), the calls timed in turn for `rounds` rounds: the ratios of the medians then compare
  calls timed seconds apart, not minutes (this machine's speed drifts)."""
  seconds = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - start)
  return {name: float(np.median(times)) for name, times in seconds.items()}


def side_by_side(ours, theirs, rounds: int) -> tuple[float, float]:
  """The median seconds of ours() and of theirs(), timed in turn (`in_turn`) after two calls
  of each that compile and warm up."""
  for run in (ours, theirs, ours, theirs):
    run()
  seconds = in_turn({"ours": ours, "theirs": theirs}, rounds)
  return seconds["ours"], seconds["theirs"]
