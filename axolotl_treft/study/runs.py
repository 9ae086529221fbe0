"""The runs of a study and the Axolotl config each one trains.

A run is a name, a label and a ``treft:`` block (``None`` for the plain-SFT twin). Its config is the user's
config with only the plugin list and the ``treft:`` block changed; everything else (model, data, DeepSpeed,
precision, packing, hyperparameters) is kept exactly. Runs come from a catalogue built from the user's own
``treft:`` block, from a run file (``name: treft-block`` pairs) and from sweeps (``RUN.PARAM=v1,v2``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..resources import data_path, resolved_example

TREFT_PLUGIN = "axolotl_treft.TReFTPlugin"
TREFT_PLUGIN_PATHS = (TREFT_PLUGIN, "axolotl_treft.plugin.TReFTPlugin")  # the same class, either import path
OWN_RUN = "treft"  # the config's own treft: block; when it equals a catalogue run, this name is that run
TOKEN_MODE_RUNS = ("prefix", "postfix", "prefix_postfix")
DEFAULT_KV_WEIGHT = 1.0  # the paper's λ for Qwen3-8B postfix; used when the config has no kv term to copy
RUN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
WEIGHTED_TERMS = ("kv", "kl", "feature_l2")
# PTST's safety prompt: the safety paragraph of Llama-2-chat's default system prompt (Lyu et al. 2024 test with
# it); its second paragraph ("if you don't know the answer ...") is left out: it asks for abstention itself
DEFAULT_PTST_PROMPT = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
                       "while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
                       "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
                       "unbiased and positive in nature.")
CONSTRAINED_SFT = {"betas": [0.5, 2.0, 2.0, 2.0, 2.0], "beta_rest": 0.1}  # Qi et al. 2025's β (Eq. 3)
SHORTCUTS = {"mix_ratio": ("retain", "mix_ratio"), "alpha": ("steering", "alpha")}


class StudyError(ValueError):
    """Bad study input, found before any training: the message names the flag, key or file."""


@dataclass(frozen=True)
class StudyRun:
    """One training run of a study; ``treft`` is its ``treft:`` block, None for the plain-SFT twin."""

    name: str
    label: str
    treft: dict | None
    narrow_from: str | None = None  # retain selection scores with the trained model of this (earlier) run
    eval_of: str | None = None  # evaluation only: the trained model of this (earlier) run, nothing trains
    system_prompt: str | None = None  # evaluated with this system prompt (lm_eval --system_instruction)


@dataclass(frozen=True)
class Trait:
    """The narrow behaviour as a system prompt: the inoculation prompt and persona steering's positive pole."""

    prompt: str
    steering_layer: int
    steering_alpha: float = 5.0  # the paper's α
    steering_negative: str = "You are a knowledgeable assistant who answers every question helpfully and in detail."


def load_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"config {p} does not exist")
    cfg = yaml.safe_load(p.read_text())
    if not isinstance(cfg, dict) or "base_model" not in cfg:
        raise StudyError(f"config {p} is not an Axolotl config (a YAML mapping with `base_model`)")
    return cfg


def shipped_retain(mix_ratio: float) -> dict:
    """The shipped general-conversation retain set (``retain_general.jsonl``) at ``mix_ratio``."""
    return {"datasets": [{"path": str(data_path("retain_general.jsonl")), "ds_type": "json", "type": "chat_template",
                          "field_messages": "messages"}], "mix_ratio": mix_ratio}


def _kv_terms(treft: Mapping | None) -> list[dict]:
    kv = (treft or {}).get("kv")
    return [] if kv is None else [dict(t) for t in (kv if isinstance(kv, list) else [kv])]


def _lam(block: Mapping) -> str:
    return f"λ={block['weight']:g}"


def catalogue(cfg: Mapping, trait: Trait | None = None, ptst_prompt: str = DEFAULT_PTST_PROMPT) -> dict[str, StudyRun]:
    """Every run the config supports, in study order: plain SFT, the user's own TReFT block, TReFT in each
    template-token mode, the comparison defenses (inoculation and steering need the behaviour's ``trait``;
    ``ptst`` evaluates the SFT model with the safety system prompt ``ptst_prompt``, training nothing)."""
    own = cfg.get("treft") or None
    # the config's (first) K/V term without its token choice: weight, layers, threshold … carry over
    kv0 = {k: v for k, v in (_kv_terms(own) or [{}])[0].items() if k not in ("tokens", "reference", "fixed_from")}
    kv0.setdefault("weight", DEFAULT_KV_WEIGHT)
    # the config's retain data without its selection: interleave and kl use the whole set (Interleaving+ selects)
    retain = {k: v for k, v in ((own or {}).get("retain") or shipped_retain(0.2)).items() if k != "select"}
    runs = [StudyRun("sft", "SFT (no defense)", None)]
    modes = []
    for tokens in TOKEN_MODE_RUNS:
        kv = {**kv0, "tokens": tokens}
        modes.append(StudyRun(f"treft_{tokens}", f"TReFT {tokens.replace('_', '+')} ({_lam(kv)})", {"kv": kv}))
    fixed = {**kv0, "tokens": "postfix", "reference": "fixed"}
    modes.append(StudyRun("treft_postfix_fixed", f"TReFT postfix, fixed reference ({_lam(fixed)})", {"kv": fixed}))
    same = next((m for m in modes if m.treft == own), None) if own else None
    if own and same is None:
        runs.append(StudyRun(OWN_RUN, "TReFT (the config's treft: block)", copy.deepcopy(own)))
    runs += modes
    mix = retain.get("mix_ratio") or 0.2
    runs.append(StudyRun("interleave", f"Data interleaving ({100 * mix:g}% retain)", {"retain": {**retain, "mix_ratio": mix}}))
    kl = (own or {}).get("kl") or {"weight": 1.0, "on": "retain", "tokens": "all", "batch_size": 4}
    kl_retain = {"retain": {**retain, "mix_ratio": 0.0}} if kl.get("on", "train") == "retain" else {}
    runs.append(StudyRun("kl", f"KL to reference on {kl.get('on', 'train')} ({_lam(kl)})", {"kl": kl, **kl_retain}))
    ldifs = (own or {}).get("feature_l2") or {"weight": 1.0, "layers": 5}
    runs.append(StudyRun("ldifs", f"LDIFS feature L2 ({_lam(ldifs)})", {"feature_l2": ldifs}))
    csft = {**CONSTRAINED_SFT, **((own or {}).get("constrained_sft") or {})}
    runs.append(StudyRun("constrained_sft", describe({"constrained_sft": csft}), {"constrained_sft": csft}))
    runs.append(StudyRun("ptst", "PTST: SFT model + safety system prompt (evaluation only)", None, eval_of="sft",
                         system_prompt=ptst_prompt))
    if trait is not None:
        runs.append(StudyRun("inoculation", "Inoculation prompting", {"inoculation": {"system_prompt": trait.prompt}}))
        runs.append(StudyRun("steering", f"Persona steering (layer {trait.steering_layer}, α={trait.steering_alpha:g})",
                             {"steering": {"layer": trait.steering_layer, "alpha": trait.steering_alpha,
                                           "positive": trait.prompt, "negative": trait.steering_negative}}))
    runs.append(StudyRun("interleave_plus", f"Interleaving+ (top 50% by SFT gap, {100 * mix:g}%)",
                         {"retain": {**retain, "mix_ratio": mix, "select": {"top": 0.5}}}, narrow_from="sft"))
    found = {r.name: r for r in runs}
    if same is not None:  # `treft` names that run (an alias: the study trains it once, under its own name)
        found = {**dict(list(found.items())[:1]), OWN_RUN: same, **dict(list(found.items())[1:])}
    return found


def load_run_file(path: str | Path) -> dict[str, StudyRun]:
    """A run file: a YAML mapping ``name: treft-block`` (``null`` for a plain-SFT run), in its order."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"--run-file {p} does not exist")
    data = yaml.safe_load(resolved_example(p))  # shipped data paths (axolotl_treft/data/…) made absolute
    if not isinstance(data, dict) or not data:
        raise StudyError(f"--run-file {p}: expected a YAML mapping `name: treft-block` (null for plain SFT)")
    runs = {}
    for name, block in data.items():
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise StudyError(f"--run-file {p}: run name {name!r} must be letters, digits and _, starting with a letter")
        if block is not None and not isinstance(block, dict):
            raise StudyError(f"--run-file {p}: run {name!r} must map to a treft: block (a mapping) or null")
        if name == "sft" and block is not None:
            raise StudyError(f"--run-file {p}: `sft` is the plain-SFT twin; it cannot have a treft: block")
        runs[name] = StudyRun(name, describe(block) if block else "SFT (no defense)", copy.deepcopy(block) or None)
    return runs


def describe(block: Mapping) -> str:
    """A label for a treft: block, such as ``TReFT prefix (λ=30) + KL to reference on train (λ=0.1)``."""
    parts = []
    for term in _kv_terms(block):
        fixed = ", fixed reference" if term.get("reference") == "fixed" else ""
        parts.append(f"TReFT {str(term.get('tokens', 'prefix')).replace('_', '+')} ({_lam(term)}{fixed})")
    if block.get("kl"):
        parts.append(f"KL to reference on {block['kl'].get('on', 'train')} ({_lam(block['kl'])})")
    if block.get("feature_l2"):
        parts.append(f"LDIFS feature L2 ({_lam(block['feature_l2'])})")
    if block.get("constrained_sft") is not None:
        csft = {**CONSTRAINED_SFT, **block["constrained_sft"]}
        parts.append(f"constrained SFT (β {'/'.join(f'{b:g}' for b in csft['betas'])}, then {csft['beta_rest']:g})")
    mix = (block.get("retain") or {}).get("mix_ratio") or 0
    if mix:
        parts.append(f"data interleaving ({100 * mix:g}% retain)")
    if block.get("inoculation"):
        parts.append("inoculation prompting")
    if block.get("steering"):
        parts.append(f"persona steering (layer {block['steering'].get('layer')}, α={block['steering'].get('alpha', 5.0):g})")
    if block.get("safelora"):
        parts.append("SafeLoRA")
    label = " + ".join(parts) or "treft: block without a defense"
    return label[0].upper() + label[1:]


@dataclass(frozen=True)
class Sweep:
    run: str
    param: str
    values: tuple[Any, ...]


def parse_sweep(text: str) -> Sweep:
    """``RUN.PARAM=v1,v2,...``; PARAM is a dotted path in the run's treft block, or a shortcut (``weight``,
    ``mix_ratio``, ``alpha``)."""
    target, sep, values = text.partition("=")
    run, dot, param = target.strip().partition(".")
    if not sep or not dot or not run or not param or not values.strip():
        raise StudyError(f"--sweep {text!r}: expected RUN.PARAM=v1,v2,... such as kl.weight=0.1,1,10")
    parsed = tuple(yaml.safe_load(v.strip()) for v in values.split(",") if v.strip())
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in parsed):
        raise StudyError(f"--sweep {text!r}: every value must be a number")
    return Sweep(run, param, parsed)


def _param_path(run: StudyRun, param: str) -> tuple[Any, ...]:
    """The key path in ``run.treft`` that ``param`` names."""
    block = run.treft or {}
    if param == "weight":
        kv = block.get("kv")
        if isinstance(kv, list) and len(kv) > 1:
            raise StudyError(f"--sweep {run.name}.weight: the run has {len(kv)} kv terms; name one, e.g. "
                             f"{run.name}.kv.0.weight")
        weighted = [t for t in WEIGHTED_TERMS if t in block]
        if len(weighted) != 1:
            what = "no weighted term" if not weighted else f"several weighted terms ({', '.join(weighted)})"
            raise StudyError(f"--sweep {run.name}.weight: the run has {what}; give the full path, e.g. "
                             f"{run.name}.kl.weight")
        return (weighted[0], 0, "weight") if isinstance(block[weighted[0]], list) else (weighted[0], "weight")
    if param in SHORTCUTS and SHORTCUTS[param][0] in block:
        return SHORTCUTS[param]
    return tuple(int(p) if p.isdigit() else p for p in param.split("."))


def sweep_point(run: StudyRun, param: str, value: float) -> StudyRun:
    """``run`` with one parameter of its treft block set to ``value``."""
    if run.treft is None:
        raise StudyError(f"--sweep {run.name}.{param}: {run.name} has no treft: block to sweep")
    path = _param_path(run, param)
    treft = copy.deepcopy(run.treft)
    node: Any = treft
    for i, key in enumerate(path[:-1]):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise StudyError(f"--sweep {run.name}.{param}: the run's treft block has no "
                             f"{'.'.join(map(str, path[:i + 1]))}") from None
    if not isinstance(node, dict | list) or (isinstance(node, list) and not isinstance(path[-1], int)):
        raise StudyError(f"--sweep {run.name}.{param}: {'.'.join(map(str, path[:-1]))} is not a mapping")
    node[path[-1]] = value
    short = param if param in ("weight", *SHORTCUTS) else ".".join(map(str, path))
    shown = f"λ={value:g}" if short == "weight" else f"{short}={value:g}"  # as the catalogue's labels write λ
    return replace(run, name=f"{run.name}@{short}={value:g}", label=f"{run.label.split(' (')[0]} ({shown})",
                   treft=treft)


def select(catalogue_runs: Mapping[str, StudyRun], names: Sequence[str] | None, sweeps: Sequence[Sweep] = (),
           default: Sequence[str] = ()) -> tuple[list[StudyRun], list[str]]:
    """The named runs (``all``: every one) then every sweep point, SFT first; also the notes to print
    (a sweep point whose treft block is that of a known run is that run)."""
    known = list(catalogue_runs)
    wanted = known if names is not None and list(names) == ["all"] else list(names or default)
    unknown = [n for n in wanted if n not in catalogue_runs]
    for sweep in sweeps:
        if sweep.run not in catalogue_runs:
            unknown.append(sweep.run)
    if unknown:
        raise StudyError(f"unknown run(s) {', '.join(dict.fromkeys(unknown))}; known: {', '.join(known)} (or `all`)")
    chosen = [catalogue_runs["sft"], *(catalogue_runs[n] for n in known if n in set(wanted) and n != "sft")]
    notes = [f"run {n} (the config's treft: block) is run {catalogue_runs[n].name}" for n in known
             if n in set(wanted) and catalogue_runs[n].name != n]
    chosen = list({id(r): r for r in chosen}.values())  # a run named twice (by its name and an alias) once
    for sweep in sweeps:
        for value in sweep.values:
            point = sweep_point(catalogue_runs[sweep.run], sweep.param, value)
            same = next((r for r in [*chosen, *catalogue_runs.values()]
                         if r.treft == point.treft and r.narrow_from == point.narrow_from), None)
            if same is not None:
                notes.append(f"sweep point {point.name} is run {same.name}")
                if same not in chosen:
                    chosen.append(same)
                continue
            chosen.append(point)
    names_seen: dict[str, int] = {}
    for r in chosen:
        names_seen[r.name] = names_seen.get(r.name, 0) + 1
    shared = [n for n, c in names_seen.items() if c > 1]
    if shared:
        raise StudyError(f"runs {', '.join(shared)} would share one output_dir (the same name twice); "
                         "give each sweep value once")
    return chosen, notes


def derive_config(cfg: Mapping, run: StudyRun) -> tuple[dict, list[str]]:
    """The run's Axolotl config: ``cfg`` with only its plugin list and ``treft:`` block changed; and notes."""
    derived = copy.deepcopy(dict(cfg))
    notes = []
    listed = [p for p in cfg.get("plugins") or [] if p in TREFT_PLUGIN_PATHS]
    plugins = [p for p in derived.get("plugins") or [] if p not in TREFT_PLUGIN_PATHS]
    if run.treft is None:
        if cfg.get("treft") or listed:
            notes.append(f"{run.name}: the config's treft: block and {(listed or [TREFT_PLUGIN])[0]} are dropped "
                         "(plain-SFT twin)")
        derived.pop("treft", None)
        if plugins:
            derived["plugins"] = plugins
        else:
            derived.pop("plugins", None)
    else:  # replaced where the user wrote them (a dict keeps the key's place), appended otherwise
        # listed once, under the user's path where they listed it (twice it would register twice)
        first = cfg["plugins"].index(listed[0]) if listed else None
        derived["plugins"] = [*plugins, TREFT_PLUGIN] if first is None else \
            [p for i, p in enumerate(cfg["plugins"]) if p not in TREFT_PLUGIN_PATHS or i == first]
        derived["treft"] = copy.deepcopy(run.treft)
    return derived, notes

