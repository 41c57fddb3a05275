"""What `python -m g2g_fast.ablate` runs: the variants of its three modes (the paper's loss
ablation, `--approaches`, `--sweep`), each an approach plus the `--set` values it trains with."""
from __future__ import annotations

from dataclasses import dataclass, field

from .options import UsageError

ABLATED = {"rl_w": "long reconstruction L1", "fml_w": "long feature matching",
           "fml_mix_rec_w": "mix-reconstruction feature matching"}
VARIANTS = {"all_on": [], "no_long_rec": ["rl_w"], "no_long_fm": ["fml_w"],
            "no_mix_rec_fm": ["fml_mix_rec_w"], "all_off": list(ABLATED)}
APPROACHES = ("funit2funit", "cyclefunit", "naive")


@dataclass
class Variant:
    name: str
    approach: str
    sets: list[str] = field(default_factory=list)  # KEY=VALUE for the trainer's --set, after the passthrough flags
    off: list[str] = field(default_factory=list)   # the loss ablation: the weights set to 0


def mode_of(args) -> str:
    return "approaches" if args.approaches else "sweep" if args.sweep is not None else "losses"


def build_variants(args) -> dict[str, Variant]:
    """The variants of the mode, narrowed to --variants; UsageError on a bad --sweep or name."""
    mode = mode_of(args)
    if mode == "losses":
        if args.approach not in (None, "funit2funit"):
            raise UsageError(f"--approach {args.approach}: the loss ablation switches FUNIT2FUNIT's losses off; "
                             f"--approach is for --sweep (--approaches compares the approaches)")
        variants = {v: Variant(v, "funit2funit", [f"{k}=0" for k in off], list(off)) for v, off in VARIANTS.items()}
    elif mode == "approaches":
        if args.approach is not None:
            raise UsageError("--approach with --approaches: --approaches runs every approach")
        variants = {a: Variant(a, a) for a in APPROACHES}
    else:
        variants = {}
        for sweep in args.sweep:
            for name, sets in sweep_variants(sweep):
                if name in variants:
                    raise UsageError(f"--sweep {sweep}: variant {name} is already swept")
                variants[name] = Variant(name, args.approach or "funit2funit", sets)
    if args.variants is None:
        return variants
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in variants]
    if unknown or not names:
        raise UsageError(f"--variants {args.variants}: unknown {', '.join(unknown) or 'empty list'}; "
                         f"choose from {', '.join(variants)}")
    return {v: variants[v] for v in names}


def sweep_variants(sweep: str) -> list[tuple[str, list[str]]]:
    """`--sweep` KEY=V1,V2,... -> one (name KEY_V, [KEY=V]) per value; KEY=V+KEY2=W -> one variant
    with both settings, named KEY_V+KEY2_W."""
    example = "e.g. content_dim=0,16,4 or class_shots=4+class_encoder=coco"
    if "+" in sweep:
        pairs = [part.partition("=") for part in sweep.split("+")]
        if not all(k.strip() and eq and v.strip() and "," not in v for k, eq, v in pairs):
            raise UsageError(f"--sweep {sweep}: expected KEY=V+KEY2=W (one value each), {example}")
        name = "+".join(f"{k.strip()}_{v.strip()}" for k, _, v in pairs)
        return [(name, [f"{k.strip()}={v.strip()}" for k, _, v in pairs])]
    key, _, values = sweep.partition("=")
    key, values = key.strip(), [v.strip() for v in values.split(",")]
    if not key or not all(values) or len(set(values)) != len(values):
        raise UsageError(f"--sweep {sweep}: expected KEY=V1,V2,... with distinct values, {example}")
    return [(f"{key}_{v}", [f"{key}={v}"]) for v in values]
