"""`starcoder prepare`'s settings: its flags over an optional TOML, YAML or JSON file, checked and turned into a
PrepareConfig."""

from __future__ import annotations

from pathlib import Path

from ..errors import StarCoderError
from ..files import read_settings
from .filters import PERMISSIVE_LICENSES
from .prepare import PrepareConfig

CONFIG_KEYS = {"input": list, "out": str, "languages": list, "licenses": list, "opt_out": list, "opt_out_file": str,
               "mbpp": str, "multiple": list, "decontaminate": bool, "pii": bool, "pii_model": str,
               "pii_regex": bool, "format": str,
               "task_mb": (int, float), "workers": int, "executor": str}


def read_config_file(path: Path) -> dict:
    """Settings from a TOML, YAML or JSON file, checked against CONFIG_KEYS."""
    raw = read_settings(path)
    for key, value in raw.items():
        if key not in CONFIG_KEYS:
            raise StarCoderError(f"{path}: unknown setting {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, CONFIG_KEYS[key]) or (isinstance(value, bool) and CONFIG_KEYS[key] is not bool):
            raise StarCoderError(f"{path}: setting {key!r} has the wrong type ({type(value).__name__})")
    return raw


def prepare_config(args) -> tuple[PrepareConfig, dict]:
    """The run's settings from `starcoder prepare`'s flags over its --config file."""
    settings = read_config_file(Path(args.config)) if args.config else {}
    flags = {"input": args.input, "out": args.out, "languages": args.language, "licenses": args.licenses,
             "opt_out_file": args.opt_out, "mbpp": args.mbpp, "multiple": args.multiple,
             "decontaminate": False if args.no_decontaminate else None, "pii": False if args.no_pii else None,
             "pii_model": args.pii_model, "pii_regex": False if args.no_pii_regex else None,
             "format": args.format, "task_mb": args.task_mb, "workers": args.workers, "executor": args.executor}
    settings.update({key: value for key, value in flags.items() if value is not None})
    if not settings.get("input") or not settings.get("out"):
        raise StarCoderError("prepare needs --input and --out (as flags or in --config)")
    opt_out = set(settings.get("opt_out", []))
    if settings.get("opt_out_file"):
        path = Path(settings["opt_out_file"])
        try:
            opt_out |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
        except OSError as e:
            raise StarCoderError(f"{path}: cannot read the opt-out list ({e})") from None
    if not settings.get("pii_regex", True) and not settings.get("pii_model"):
        raise StarCoderError("--no-pii-regex leaves no PII detector: pass --pii-model DIR (or --no-pii)")
    task_mb = settings.get("task_mb", PrepareConfig.task_bytes / 2**20)
    if task_mb <= 0:
        raise StarCoderError(f"task size {task_mb} MB must be positive")
    workers = settings.get("workers")
    if workers is not None and workers < 1:
        raise StarCoderError(f"workers {workers} must be at least 1")
    config = PrepareConfig(
        inputs=[Path(p) for p in settings["input"]], out=Path(settings["out"]),
        languages=frozenset(settings["languages"]) if settings.get("languages") else None,
        licenses=frozenset(settings["licenses"]) if settings.get("licenses") else PERMISSIVE_LICENSES,
        opt_out=frozenset(opt_out), decontaminate=settings.get("decontaminate", True),
        mbpp=Path(settings["mbpp"]) if settings.get("mbpp") else None,
        multiple=[Path(p) for p in settings.get("multiple", [])], redact_pii=settings.get("pii", True),
        pii_model=settings.get("pii_model"), pii_regex=settings.get("pii_regex", True),
        output_format=settings.get("format", "jsonl"), task_bytes=int(task_mb * 1024 * 1024))
    return config, {"workers": workers, "executor": settings.get("executor", "local")}
