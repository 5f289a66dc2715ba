"""Which checkpoints a run keeps: Megatron-LM's --save-retain-interval.

Without it every saved iteration stays (an ESFT checkpoint of DeepSeek-V2-Lite is ~44 GiB, ~18 GiB with
--save-trained-weights-only). With `--save-retain-interval N` (a multiple of --save-interval), when a new iteration
becomes the latest, the one that was the latest before it is removed unless its number is a multiple of N, as in
Megatron-LM: the run keeps every N-th iteration and the newest. Never removed: an iteration newer than the one just
saved (a run resumed with --ckpt-step from an earlier one leaves the later ones alone), and the checkpoint this run
started from when it lies in the same directory (a --save-trained-weights-only checkpoint reads its frozen weights
from it). The best-validation checkpoints (`<--save>/best/`) keep only the newest, the best one, always.

Removal happens on rank 0 after the new iteration is published (renamed into place, tracker updated): the old
directory is first renamed to a hidden `.iter_X.removing-*` name, so a reader never sees half of it, and a removal
cut short by a kill is finished by the next save (mcore_checkpoint.save_checkpoint clears such leftovers).
"""

from __future__ import annotations

import os
import shutil
import uuid

REMOVING = ".removing-"  # part of the hidden name of an iteration being removed


def to_remove(previous: int | None, saved: int, interval: int | None, protected: set[int]) -> int | None:
    """The iteration to remove now that `saved` is the latest and `previous` was. `interval`: None keeps every
    iteration, N > 0 every N-th (and the newest), 0 only the newest (the `best/` directory: an earlier best
    iteration is a worse one)."""
    if interval is None or previous is None or previous >= saved or previous in protected:
        return None
    if interval and previous % interval == 0:
        return None
    return previous


def remove_iteration(directory: str) -> bool:
    """Remove an iteration's directory (`root/iter_X`, renamed out of sight to `root/.iter_X.removing-*` first).
    False when it is not there."""
    if not os.path.isdir(directory):
        return False
    root, name = os.path.split(os.path.normpath(directory))
    hidden = os.path.join(root, f".{name}{REMOVING}{uuid.uuid4().hex[:8]}")
    os.replace(directory, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
    return True


def is_leftover(name: str) -> bool:
    """A hidden directory of an interrupted removal (cleared by the next save)."""
    return name.startswith(".iter_") and REMOVING in name
