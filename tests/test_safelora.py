"""SafeLoRA: projection vs an independent dense computation, selection, PEFT loading, Qwen2 biases, CLI, plugin hook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axolotl_treft.defenses.safelora import (
    REPORT_NAME,
    SafeLoRAError,
    SafeLoRASettings,
    apply_after_training,
    run_safelora,
)

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------- fixtures


def _perturbed_copy(model, out: Path, seed: int, scale: float = 0.05, max_shard_size=None) -> Path:
    """Save ``model`` with every weight matrix perturbed (a stand-in for alignment training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" not in name:  # matrices, norms and (Qwen2) q/k/v biases alike
                p.add_(scale * torch.randn(p.shape, generator=gen))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def _make_lora(base_dir: Path, out: Path, targets, seed: int, **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    from tests.reg_harness import randomize_lora_b

    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, **lora_kwargs))
    randomize_lora_b(peft_model, 0.1).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """(base dir, aligned dir [sharded], adapter dir) for a tiny untied Llama; adapter has modules_to_save."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("safelora-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    _perturbed_copy(model, root / "aligned", seed=1, max_shard_size="40KB")
    assert (root / "aligned" / "model.safetensors.index.json").is_file()  # exercises the sharded path
    _make_lora(root / "base", root / "adapter", TARGETS, seed=2, r=4, lora_alpha=8,
               modules_to_save=["lm_head"])
    return root / "base", root / "aligned", root / "adapter"


def _dense_reference(base_dir: Path, aligned_dir: Path, adapter_dir: Path, fan_in_fan_out=False):
    """module path → (cosine, C·B, B) computed densely in float64 from fully loaded models."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    aligned = AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32).state_dict()
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    out = {}
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        a = adapter[key].double()
        b = adapter[key.replace("lora_A", "lora_B")].double()
        v = aligned[module + ".weight"].double() - base[module + ".weight"].double()
        if fan_in_fan_out:
            v = v.t()
        c = v @ v.t() / torch.linalg.norm(v)  # dense out × out, as in the paper / IBM code
        delta = scaling * b @ a
        cos = torch.nn.functional.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0).item()
        out[module] = (cos, c @ b, b)
    return out


@pytest.fixture(scope="module")
def llama_dense(llama_pair):
    return _dense_reference(*llama_pair)


def _lowest(dense, k):
    return set(sorted(dense, key=lambda m: dense[m][0])[:k])


# ---------------------------------------------------------------------------------------------- tests


def test_projection_matches_dense_top_k(llama_pair, llama_dense, tmp_path):
    from safetensors.torch import load_file

    base, aligned, adapter = llama_pair
    result = run_safelora(adapter, base, aligned, tmp_path / "out", SafeLoRASettings("top_k", top_k=3))
    out = tmp_path / "out"
    report = json.loads((out / REPORT_NAME).read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["settings"] == {"select": "top_k", "top_k": 3}
    assert report["num_modules"] == 14 and report["num_projected"] == 3

    expected = _lowest(llama_dense, 3)
    rows = {r["name"]: r for r in report["modules"]}
    assert set(rows) == set(llama_dense)
    assert {m for m, r in rows.items() if r["projected"]} == expected == set(report["projected"])
    cosines = [r["cosine"] for r in rows.values()]
    assert len(set(cosines)) == len(cosines) and all(0.0 <= c <= 1.0 for c in cosines)
    for m, (cos, _, _) in llama_dense.items():
        assert rows[m]["cosine"] == pytest.approx(cos, abs=1e-5)

    src = load_file(str(adapter / "adapter_model.safetensors"))
    new = load_file(str(out / "adapter_model.safetensors"))
    assert set(new) == set(src)
    for m, (_, cb, b) in llama_dense.items():
        b_key = f"{PREFIX}{m}.lora_B.weight"
        a_key = f"{PREFIX}{m}.lora_A.weight"
        assert torch.equal(new[a_key], src[a_key])
        if m in expected:
            torch.testing.assert_close(new[b_key].double(), cb, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(new[b_key].double(), b, atol=1e-3)  # the projection changed it
        else:
            assert torch.equal(new[b_key], src[b_key])
    lm_head = [k for k in src if "lm_head" in k]
    assert lm_head and all(torch.equal(new[k], src[k]) for k in lm_head)  # modules_to_save copied as is
    assert "base_model.model.lm_head.weight" in report["copied_unchanged"]
    assert (out / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()


def test_threshold_selects_exactly_cosines_below(llama_pair, llama_dense, tmp_path):
    base, aligned, adapter = llama_pair
    ordered = sorted(c for c, _, _ in llama_dense.values())
    tau = (ordered[5] + ordered[6]) / 2  # 6 modules at or below
    result = run_safelora(adapter, base, aligned, tmp_path / "t", SafeLoRASettings("threshold", threshold=tau))
    assert set(result.projected) == {m for m, (c, _, _) in llama_dense.items() if c <= tau}
    assert len(result.projected) == 6
    assert result.report["settings"] == {"select": "threshold", "threshold": tau}
    # cos(CΔW, ΔW) = ‖VᵀΔW‖²/‖V‖ / (…) ≥ 0: threshold 1 projects everything, -1 nothing
    assert len(run_safelora(adapter, base, aligned, tmp_path / "all", SafeLoRASettings("threshold", threshold=1.0))
               .projected) == 14
    assert run_safelora(adapter, base, aligned, tmp_path / "none",
                        SafeLoRASettings("threshold", threshold=-1.0)).projected == []
    # k larger than the module count projects all of them
    assert len(run_safelora(adapter, base, aligned, tmp_path / "k", SafeLoRASettings("top_k", top_k=50))
               .projected) == 14


def test_output_loads_with_peft_and_changes_forward_only_when_projected(llama_pair, llama_dense, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, aligned, adapter = llama_pair
    run_safelora(adapter, base, aligned, tmp_path / "proj", SafeLoRASettings("top_k", top_k=2))
    run_safelora(adapter, base, aligned, tmp_path / "same", SafeLoRASettings("threshold", threshold=-1.0))
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])

    def logits_and_model(adapter_dir):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
        with torch.no_grad():
            return peft_model(input_ids=ids).logits, peft_model

    ref, _ = logits_and_model(adapter)
    same, _ = logits_and_model(tmp_path / "same")
    proj, proj_model = logits_and_model(tmp_path / "proj")
    assert torch.equal(same, ref)
    assert not torch.allclose(proj, ref, atol=1e-6)
    expected = _lowest(llama_dense, 2)
    params = dict(proj_model.named_parameters())
    for m, (_, cb, b) in llama_dense.items():
        loaded = params[f"{PREFIX}{m}.lora_B.default.weight"].detach().double()
        torch.testing.assert_close(loaded, cb if m in expected else b, atol=1e-5, rtol=1e-5)


def test_qwen2_with_qkv_biases(tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    with safe_open(str(tmp_path / "base" / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in set(f.keys())
    _perturbed_copy(model, tmp_path / "aligned", seed=3)
    _make_lora(tmp_path / "base", tmp_path / "adapter", ["q_proj", "k_proj", "v_proj"], seed=4, r=4,
               lora_alpha=8, use_rslora=True)
    dense = _dense_reference(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter")
    result = run_safelora(tmp_path / "adapter", tmp_path / "base", tmp_path / "aligned", tmp_path / "out",
                          SafeLoRASettings("top_k", top_k=2))
    rows = {r["name"]: r for r in result.report["modules"]}
    assert set(rows) == set(dense) and len(rows) == 6
    assert all(r["weight"].endswith(".weight") for r in rows.values())
    assert result.report["lora"]["use_rslora"] is True
    assert rows["model.layers.0.self_attn.q_proj"]["scaling"] == pytest.approx(8 / 2)
    for m, (cos, _, _) in dense.items():
        assert rows[m]["cosine"] == pytest.approx(cos, abs=1e-5)
    assert set(result.projected) == _lowest(dense, 2)
    new = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for m in result.projected:
        torch.testing.assert_close(new[f"{PREFIX}{m}.lora_B.weight"].double(), dense[m][1], atol=1e-5, rtol=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_gpt2_fan_in_fan_out(tmp_path):
    """Conv1D layers store W as in × out; the adapter's fan_in_fan_out flag must transpose V."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    _perturbed_copy(model, tmp_path / "aligned", seed=5)
    _make_lora(tmp_path / "base", tmp_path / "adapter", ["c_attn", "c_fc"], seed=6, r=2, lora_alpha=4,
               fan_in_fan_out=True)
    dense = _dense_reference(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter", fan_in_fan_out=True)
    result = run_safelora(tmp_path / "adapter", tmp_path / "base", tmp_path / "aligned", tmp_path / "out",
                          SafeLoRASettings("top_k", top_k=1))
    rows = {r["name"]: r for r in result.report["modules"]}
    for m, (cos, _, _) in dense.items():
        assert rows[m]["cosine"] == pytest.approx(cos, abs=1e-5)
    (m,) = result.projected
    new = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    torch.testing.assert_close(new[f"{PREFIX}{m}.lora_B.weight"].double(), dense[m][1], atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(llama_pair, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base, aligned, adapter = llama_pair
    with pytest.raises(SafeLoRAError, match="top_k"):
        SafeLoRASettings("top_k", top_k=0)
    with pytest.raises(SafeLoRAError, match=r"threshold.*\[-1, 1\]"):
        SafeLoRASettings("threshold", threshold=1.5)
    with pytest.raises(SafeLoRAError, match="select"):
        SafeLoRASettings("bottom_k")
    assert issubclass(SafeLoRAError, ValueError)

    # aligned model of another architecture (wider)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(SafeLoRAError, match="different architectures.*hidden_size"):
        run_safelora(adapter, base, tmp_path / "wide", tmp_path / "o1")
    # same config.json but different tensors: caught per module, naming it
    shutil.copy(base / "config.json", tmp_path / "wide" / "config.json")
    with pytest.raises(SafeLoRAError, match=r"model\.layers\.0\.\S+: base and aligned models differ.*shape"):
        run_safelora(adapter, base, tmp_path / "wide", tmp_path / "o2")
    # a module missing in the base model
    one_layer = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=False))
    one_layer.save_pretrained(tmp_path / "short")
    cfg = json.loads((tmp_path / "short" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "short" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SafeLoRAError, match=r"model\.layers\.1\.\S+ not found in the base model"):
        run_safelora(adapter, tmp_path / "short", aligned, tmp_path / "o3")
    # identical base and aligned
    with pytest.raises(SafeLoRAError, match="identical"):
        run_safelora(adapter, base, base, tmp_path / "o4")
    # not an adapter / not LoRA / missing weights
    with pytest.raises(SafeLoRAError, match="no adapter_config.json.*full fine-tune"):
        run_safelora(base, base, aligned, tmp_path / "o5")
    ia3 = tmp_path / "ia3"
    shutil.copytree(adapter, ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (ia3 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SafeLoRAError, match="not a LoRA adapter"):
        run_safelora(ia3, base, aligned, tmp_path / "o6")
    (ia3 / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (ia3 / "adapter_model.safetensors").unlink()
    with pytest.raises(SafeLoRAError, match="no adapter_model.safetensors"):
        run_safelora(ia3, base, aligned, tmp_path / "o7")
    with pytest.raises(SafeLoRAError, match="does not exist"):
        run_safelora(adapter, tmp_path / "nope", aligned, tmp_path / "o8")
    with pytest.raises(SafeLoRAError, match="is the adapter directory"):
        run_safelora(adapter, base, aligned, adapter)
    assert not any((tmp_path / f"o{i}" / REPORT_NAME).exists() for i in range(1, 9))


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
    exe = Path(sys.executable).with_name("axolotl-treft")
    return subprocess.run([str(exe), "safelora", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_cli_end_to_end_and_bad_inputs(llama_pair, llama_dense, tmp_path):
    base, aligned, adapter = llama_pair
    proc = _cli("--adapter", adapter, "--base-model", base, "--aligned-model", aligned, "--out", tmp_path / "cli",
                "--top-k", 4)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "cli" / REPORT_NAME).read_text())
    assert set(report["projected"]) == _lowest(llama_dense, 4)
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file()
    assert "projected 4/14 modules" in proc.stdout

    # shape mismatch between base and adapter: a Qwen2 base of another width
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "q")
    proc = _cli("--adapter", adapter, "--base-model", tmp_path / "q", "--aligned-model", tmp_path / "q",
                "--out", tmp_path / "bad1")
    assert proc.returncode == 2
    assert "shape mismatch" in proc.stderr and "model.layers.0." in proc.stderr
    # a full-finetune output dir (model weights + config.json, no adapter_config.json)
    proc = _cli("--adapter", aligned, "--base-model", base, "--aligned-model", aligned, "--out", tmp_path / "bad2")
    assert proc.returncode == 2
    assert "adapter_config.json" in proc.stderr and "full fine-tune" in proc.stderr
    proc = _cli("--adapter", adapter, "--base-model", base, "--aligned-model", aligned, "--out", tmp_path / "bad3",
                "--top-k", 0)
    assert proc.returncode == 2 and "top_k" in proc.stderr
    assert not (tmp_path / "bad1").exists() and not (tmp_path / "bad2").exists()


def test_apply_after_training_is_idempotent(llama_pair, llama_dense, tmp_path, monkeypatch):
    from axolotl.utils.dict import DictDefault

    base, aligned, adapter = llama_pair
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(adapter / "adapter_config.json", run_dir)  # Axolotl pre-saves the config before training
    cfg = DictDefault({
        "output_dir": str(run_dir),
        "adapter": "lora",
        "treft": {"safelora": {"base_model": str(base), "aligned_model": str(aligned), "select": "top_k",
                               "top_k": 2}},
    })
    out = run_dir / "safelora"
    # first post_train call: before the final save
    assert apply_after_training(cfg) == "waiting"
    assert not out.exists()
    shutil.copy(adapter / "adapter_model.safetensors", run_dir)
    # a non-zero rank never writes (also after Axolotl destroyed the process group)
    monkeypatch.setenv("RANK", "1")
    assert apply_after_training(cfg) == "not-rank-0"
    assert not out.exists()
    monkeypatch.setenv("RANK", "0")
    assert apply_after_training(cfg) == "done"
    report = json.loads((out / REPORT_NAME).read_text())
    assert set(report["projected"]) == _lowest(llama_dense, 2)
    assert report["settings"] == {"select": "top_k", "top_k": 2}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # second call with the same adapter: no work
    assert apply_after_training(cfg) == "skipped"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # other settings, or new adapter weights, redo it; an explicit output_dir is honoured
    cfg.treft.safelora.threshold = 0.99
    cfg.treft.safelora.select = "threshold"
    cfg.treft.safelora.output_dir = str(tmp_path / "explicit")
    assert apply_after_training(cfg) == "done"
    assert json.loads((tmp_path / "explicit" / REPORT_NAME).read_text())["settings"] == {
        "select": "threshold", "threshold": 0.99}
    assert apply_after_training(cfg) == "skipped"
    assert apply_after_training(DictDefault({"output_dir": str(run_dir)})) == "disabled"
