"""The command line's shared flags, each declared once: the training options (one flag per ``TrainConfig`` field,
grouped), flags several commands take (``flag``), and ``-q``/``-v`` on every command. ``finegrain.cli`` builds the
commands from these; nothing here imports PyTorch.
"""

from __future__ import annotations

import argparse

from finegrain.config import TrainConfig
from finegrain.run_layout import RunDir

ENGINES = ("auto", "torch", "onnx")
ENGINE_HELP = (
    "auto: an .onnx file runs in ONNX Runtime; a checkpoint runs in whichever of PyTorch and ONNX Runtime measured "
    "faster on this machine (checked for equal logits, remembered beside the checkpoint); torch; onnx (default: auto)"
)


def _add_train_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``TrainConfig`` option, its help and parsing from the option's own field (no second copy),
    under a heading per option group (dataset, model, optim ...), each default said once."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, f in TrainConfig.options():
        if f.name in skip:
            continue
        default = TrainConfig.option_default(f)
        kw = dict(f.metadata["cli"])
        said = "default" in f.metadata["help"].lower()  # the help names its own default ("the backbone's")
        kw["help"] = f.metadata["help"] if said else f"{f.metadata['help']} (default: {default})"
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw and not kw.get("nargs"):
            kw["type"] = type(default) if isinstance(default, int | float) else str
        if "action" not in kw and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = f.name.upper()
        if group not in groups:
            groups[group] = p.add_argument_group(f"{group} options")
        groups[group].add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kw)


#: flags several commands take that are not training options, declared once here
COMMON: dict[str, tuple[tuple[str, ...], dict]] = {
    "checkpoint": (("checkpoint",), {"help": f"checkpoint file or run directory (uses {RunDir.BEST})"}),
    "json": (("--json",), {"action": "store_true", "help": "JSON output"}),
    "config": (("--config",), {"help": "YAML file of options (command-line options override it)"}),
    "resume": (("--resume",), {"metavar": "RUN_DIR", "help": f"continue a stopped run from RUN_DIR/{RunDir.LAST}"}),
    "engine": (("--engine",), {"default": "auto", "choices": ENGINES, "help": ENGINE_HELP}),
    # every command that writes a folder names it --out-dir (--out: the older name); --out alone is a file
    "out_dir": (("--out-dir", "--out"), {"dest": "out", "help": "output folder"}),
    "top_k": (
        ("-k", "--top-k", "--topk"),
        {
            "dest": "topk",
            "type": int,
            "default": 5,
            "help": "classes per image, as the API's and the HTTP `k` (default: 5)",
        },
    ),
}


def flag(p: argparse.ArgumentParser, name: str, note: str = "", **kw) -> None:
    """A flag several commands share, from its one declaration: a training option (its help, type and choices from
    ``TrainConfig``; a command may give it its own default, and a ``note`` on what it means there) or ``COMMON``."""
    if name in COMMON:
        args, base = COMMON[name]
        kw = {**base, **kw}
        if "default" in kw and kw["help"] == base["help"]:
            kw["help"] += f" (default: {kw['default']})"
        p.add_argument(*args, **kw)
        return
    f = next(f for _, f in TrainConfig.options() if f.name == name)
    own = TrainConfig.option_default(f)  # types the flag, whatever default this command gives it
    default = kw.pop("default", own)
    text = f.metadata["help"] + (f"; {note}" if note else "")
    said = "default" in text.lower()
    kw.setdefault("help", text if said or default is None else f"{text} (default: {default})")
    if own is not None and not isinstance(own, bool) and "type" not in f.metadata["cli"]:
        kw.setdefault("type", type(own))
    p.add_argument("--" + name.replace("_", "-"), default=default, **{**f.metadata["cli"], **kw})


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-q``/``-v`` on every command and sub-command (declared once, here)."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for command in action.choices.values():
            if command._subparsers is not None:
                _add_output_options(command)
            else:
                group = command.add_argument_group("output")
                group.add_argument("-q", "--quiet", action="store_true", help="print only errors")
                group.add_argument("-v", "--verbose", action="store_true", help="also the library's debug log")
