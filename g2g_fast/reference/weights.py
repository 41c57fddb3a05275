"""Loading pretrained weight files safely: `weights_only=True` always (a file from the internet
must not run code), strict key checks with errors that name the file and the first mismatches."""
from __future__ import annotations

import os

import torch.nn as nn

from ..torch_files import safe_torch_load


def read_state_dict(path: str | os.PathLike, what: str = "state dict file", flag: str | None = None) -> dict:
    """Read a state dict saved with `torch.save`, either bare or wrapped under "state_dict".
    Any failure is one ValueError naming `flag` (the option that named the file) and the file."""
    state = safe_torch_load(path, what=what, flag=flag)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{flag + ' ' if flag else ''}{os.fspath(path)}: expected a state dict, "
                         f"got {type(state).__name__}")
    return state


def load_checked(module: nn.Module, state: dict, path: str | os.PathLike, what: str,
                 assign: bool = False) -> None:
    """Load `state` into `module` strictly; on any mismatch raise a ValueError naming the file.

    We check ourselves instead of relying on `load_state_dict`'s RuntimeError so that the message
    names the file and stays short (a wrong file may mismatch on hundreds of keys).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", wrong_shape)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                problems.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(f"{os.fspath(path)} is not a {what} state dict; " + "; ".join(problems))
    # Casting to float32 keeps this an fp32 reference even if the file was saved in half
    # precision. assign=True is for modules built on the meta device (no wasted random init).
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


class Frozen(nn.Module):
    """A pretrained network used as a fixed function: no trainable parameters, always in eval mode.

    `train()` is overridden because callers routinely put the whole model in train mode; BatchNorm
    here must keep using the pretrained running statistics, never batch statistics.
    """

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)
