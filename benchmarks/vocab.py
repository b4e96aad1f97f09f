"""Before/after figures for vocabulary trimming (``python -m train trim-vocab``), side by side, in one run.

    python -m benchmarks.vocab --trimmed /tmp/g3-dls \\
        [--model embedded:gemma-3-270m] [--corpus ../shared/data/dls/train.csv,../shared/data/dls/test.csv] \\
        [--prompts 20] [--train-steps 3] [--batch 8]

``--trimmed`` is made with trim-vocab first if it does not exist. Each variant runs in its own subprocess (so that
peak RSS is its own): 4-bit load through ``train.model.load_classifier`` (timed), classifier logits on the first
``--prompts`` prompts of the first corpus CSV (the trimmed variant gets the original's score head, so the logits are
comparable), the adapter folder as ``train.artifacts.save_adapter`` writes it (LoRA + head + tokenizer), then a few
LoRA training steps (peak RSS read from ``ru_maxrss``). Printed: embedding rows, parameters (causal LM, from the
safetensors headers; and the 4-bit classifier as the toolkit counts it), model and adapter folder sizes, load time,
RSS, step time, and the maximum absolute difference of the logits.

On CPU, read the memory rows with care: an fp32 checkpoint loaded in fp32 keeps its embedding memory-mapped from the
safetensors file, and only the pages of the rows looked up are ever resident, so RSS hardly sees the 640 MB
embedding of Gemma 3 270M; "weights in memory" (what a GPU holds: every parameter resident) is the fair figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    """One variant: load, logits, adapter folder, training steps; JSON to ``args.result``."""
    import numpy as np
    import torch

    from core.adapter import save_adapter
    from core.config import LoraArgs, ModelArgs, QuantizationArgs, RunConfig
    from core.data import collate, read_csv
    from core.model import load_classifier
    from train.lora import apply_lora, count_parameters

    torch.manual_seed(0)
    cfg = RunConfig()
    ds = read_csv(args.data, cfg.data)
    labels = ds.labels
    n_labels = labels.shape[1]
    t0 = time.perf_counter()
    model, tok, _ = load_classifier(args.worker, n_labels, ModelArgs(name_or_path=args.worker),
                                    QuantizationArgs(), torch.device("cpu"), seed=0)
    load_s = time.perf_counter() - t0
    emb = model.get_input_embeddings().weight
    res = {"load_s": load_s, "rss_after_load_mb": rss_mb(), "footprint_mb": model.get_memory_footprint() / 2**20,
           "embedding_mb": emb.numel() * emb.element_size() / 2**20,
           "embedding_bf16_mb": emb.numel() * 2 / 2**20, "classifier_params_4bit": count_parameters(model)["total"],
           "embedding_rows": model.get_input_embeddings().weight.shape[0]}
    if args.head_in:
        head = torch.load(args.head_in)
        model.score.weight.data.copy_(head)
    else:
        torch.save(model.score.weight.data.clone(), args.head_out)
    ids = [tok(t)["input_ids"] for t in ds.texts[:args.prompts]]
    model.eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([row])).logits[0].float().numpy() for row in ids]
    np.save(args.logits_out, np.stack(logits))
    res["prompt_token_ids"] = ids[:2]
    model = apply_lora(model, LoraArgs(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]),
                       grad_checkpointing=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        save_adapter(model, tok, folder, cfg, ds.label_names, {}, {})
        res["adapter_folder_bytes"] = folder_bytes(folder)
        res["adapter_tokenizer_bytes"] = sum(p.stat().st_size for p in folder.glob("tokenizer*"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = []
    for step in range(args.train_steps):
        rows = list(range(step * args.batch, (step + 1) * args.batch))
        batch = collate([tok(ds.texts[i])["input_ids"] for i in rows], tok.pad_token_id, labels[rows])
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t)
    res["train_step_s"] = float(np.median(steps)) if steps else None
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(res))


def run_variant(path: str, data: str, tmp: Path, name: str, args, head_in: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vocab", "--worker", path, "--data", data,
           "--prompts", str(args.prompts), "--train-steps", str(args.train_steps), "--batch", str(args.batch),
           "--result", str(tmp / f"{name}.json"), "--logits-out", str(tmp / f"{name}.npy"),
           "--head-out", str(tmp / "head.pt")]
    if head_in is not None:
        cmd += ["--head-in", str(head_in)]
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads((tmp / f"{name}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vocab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:gemma-3-270m")
    p.add_argument("--trimmed", required=False, help="trimmed model folder (made with trim-vocab if missing)")
    p.add_argument("--corpus", default="../shared/data/dls/train.csv,../shared/data/dls/test.csv")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    p.add_argument("--head-out", help=argparse.SUPPRESS)
    p.add_argument("--head-in", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import numpy as np

    from core.config import ModelArgs
    from core.model import resolve_model_path
    from train.data import read_corpus, split_paths
    from train.vocab import TRIM_REPORT, trim_vocab

    corpus_paths = split_paths([args.corpus])
    src = Path(resolve_model_path(ModelArgs(name_or_path=args.model)))
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        trimmed = Path(args.trimmed) if args.trimmed else tmp / "trimmed"
        if not (trimmed / "config.json").is_file():
            t0 = time.perf_counter()
            trim_vocab(str(src), read_corpus(corpus_paths), trimmed)
            print(f"trim-vocab took {time.perf_counter() - t0:.0f}s")
        report = json.loads((trimmed / TRIM_REPORT).read_text())
        before = run_variant(str(src), corpus_paths[0], tmp, "before", args)
        after = run_variant(str(trimmed), corpus_paths[0], tmp, "after", args, head_in=tmp / "head.pt")
        kept = json.loads((trimmed / "id_map.json").read_text())["kept_old_ids"]
        for a, b in zip(before["prompt_token_ids"], after["prompt_token_ids"]):
            assert [kept[i] for i in b] == a, "trimmed ids do not map back to the original ids"
        diff = float(np.abs(np.load(tmp / "before.npy") - np.load(tmp / "after.npy")).max())
        rows = [
            ("embedding rows", before["embedding_rows"], after["embedding_rows"], "{:,}"),
            ("parameters (causal LM, safetensors)", safetensors_params(src), safetensors_params(trimmed), "{:,}"),
            ("parameters (4-bit classifier, count_parameters)", before["classifier_params_4bit"],
             after["classifier_params_4bit"], "{:,}"),
            ("model folder MB", folder_bytes(src) / 2**20, folder_bytes(trimmed) / 2**20, "{:.1f}"),
            ("adapter folder MB (save_adapter)", before["adapter_folder_bytes"] / 2**20,
             after["adapter_folder_bytes"] / 2**20, "{:.2f}"),
            ("  of which tokenizer files MB", before["adapter_tokenizer_bytes"] / 2**20,
             after["adapter_tokenizer_bytes"] / 2**20, "{:.2f}"),
            ("weights in memory MB (4-bit, get_memory_footprint)", before["footprint_mb"], after["footprint_mb"],
             "{:.1f}"),
            ("  of which embedding MB (fp32 on CPU)", before["embedding_mb"], after["embedding_mb"], "{:.1f}"),
            ("  embedding MB in bf16 (GPU compute dtype)", before["embedding_bf16_mb"], after["embedding_bf16_mb"],
             "{:.1f}"),
            ("4-bit load time s (load_classifier, CPU)", before["load_s"], after["load_s"], "{:.2f}"),
            ("RSS after load MB", before["rss_after_load_mb"], after["rss_after_load_mb"], "{:.0f}"),
            (f"peak RSS MB (load + {args.train_steps} LoRA steps, batch {args.batch})", before["peak_rss_mb"],
             after["peak_rss_mb"], "{:.0f}"),
            ("LoRA step time s (median)", before["train_step_s"], after["train_step_s"], "{:.2f}"),
        ]
        print(f"{'':52s} {'before':>14s} {'after':>14s}")
        for name, b, a, fmt in rows:
            print(f"{name:52s} {fmt.format(b):>14s} {fmt.format(a):>14s}")
        print(f"max |logit diff| on {args.prompts} prompts of {corpus_paths[0]} (same score head): {diff:.3g}")
        print(f"corpus coverage {report['corpus']['coverage']:.4f} ({report['corpus']['identical_texts']}/"
              f"{report['corpus']['texts']} texts identical), kept {report['kept_rows']}/{report['original_rows']}")
        for ev in report.get("eval", []):
            print(f"eval {[f['path'] for f in ev['files']]}: {ev['identical_texts']}/{ev['texts']} identical, "
                  f"{ev['byte_fallback_tokens']} byte-fallback tokens (original {ev['byte_fallback_tokens_original']}),"
                  f" {ev['unk_tokens']} unk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
