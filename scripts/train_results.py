"""Turns what scripts/gpu/train.sh and scripts/gpu/train_dp.sh brought back into the recorded results.

    tar -xzf train.tgz && tar -xzf train_dp.tgz
    PYTHONPATH=. python scripts/train_results.py train train_dp --to docs/results
    # (a .tgz may be given instead of its folder)

Writes, under --to:
  train_recovery.json / .md / _curve.png   before/after WikiText-2 perplexity, gap recovered, the
                                           training curve (log.jsonl) embedded in the JSON
  train_throughput.json / .md              tokens/s per GPU (SmolLM2 LoRA, 7B QLoRA) and the 1 -> 2
                                           GPU data-parallel ratio; each with card, versions, commit
A folder with only some of the results updates only those parts; entries already recorded from
another run are kept (the throughput JSON is merged by key: single_gpu.<case>, data_parallel).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DP_TARGET = 1.8
ALLOW_SMOKE = False  # --allow-smoke: record --tiny runs too (to check this script on a smoke run)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _text(path: str) -> str:
    return open(path).read().strip() if os.path.isfile(path) else ""


def _steps(folder: str) -> dict[str, str]:
    return {os.path.basename(p)[len("step_"):-len(".rc")]: _text(p) for p in sorted(glob.glob(f"{folder}/step_*.rc"))}


def _card(folder: str, record: dict) -> dict:
    """What ran it: the JAX device string, nvidia-smi's line, the memory cap of the run."""
    cap = re.search(r"capped at fraction ([0-9.]+)", _text(os.path.join(folder, "progress.log")))
    return {"device": record.get("device"), "nvidia_smi": _text(os.path.join(folder, "gpu.txt")) or None,
            "memory_fraction": float(cap.group(1)) if cap else None,
            "versions": record.get("versions"), "git_commit": record.get("git_commit")}


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


# ------------------------------------------------------------------------------ recovery
def record_recovery(folder: str, to: str, sub: str = "recovery") -> str | None:
    """folder/<sub>/ (recovery, recovery_gptq, ...) -> to/train_<sub>.{json,md}, train_<sub>_curve.png."""
    src = os.path.join(folder, sub, "recovery.json")
    if not os.path.isfile(src):
        return None
    from jaxcompress.io.atomic import write_json, write_text
    from jaxcompress.train.logs import read_json_log

    rec = _read_json(src)
    if rec.get("tiny") and not ALLOW_SMOKE:
        raise SystemExit(f"{src} is a --tiny smoke run, not a measurement; not recorded")
    log_path = os.path.join(folder, sub, "run", "log.jsonl")
    curve = read_json_log(log_path) if os.path.isfile(log_path) else []
    out = {**rec, "card": _card(folder, rec), "steps": _steps(folder),
           "curve": [{k: v for k, v in e.items() if k != "time"} for e in curve]}
    write_json(os.path.join(to, f"train_{sub}.json"), out)
    png = os.path.join(folder, sub, "recovery_curve.png")
    lines = [_text(os.path.join(folder, sub, "recovery.md")), ""]
    if os.path.isfile(png):
        shutil.copyfile(png, os.path.join(to, f"train_{sub}_curve.png"))
        lines += [f"![training loss and held-out perplexity](train_{sub}_curve.png)", ""]
    card = out["card"]
    lines += [f"Card: {card['nvidia_smi'] or card['device']}. Source: scripts/gpu/train.sh "
              f"(step rc: {', '.join(f'{k}={v}' for k, v in out['steps'].items())}).", ""]
    if not rec.get("complete"):
        lines += ["**The run did not complete**: only the rows above were measured.", ""]
    write_text(os.path.join(to, f"train_{sub}.md"), "\n".join(lines))
    return os.path.join(to, f"train_{sub}.json")


# ------------------------------------------------------------------------------ throughput
def record_throughput(folders: list[str], to: str) -> str | None:
    from jaxcompress.io.atomic import write_json, write_text

    path = os.path.join(to, "train_throughput.json")
    merged = _read_json(path) if os.path.isfile(path) else {"single_gpu": {}, "data_parallel": None}
    found = False
    for folder in folders:
        for src in sorted(glob.glob(os.path.join(folder, "throughput_*.json"))):
            rec = _read_json(src)
            if rec.get("tiny") and not ALLOW_SMOKE:
                raise SystemExit(f"{src} is a --tiny smoke run, not a measurement; not recorded")
            found = True
            card = _card(folder, rec)
            tag = os.path.splitext(os.path.basename(src))[0][len("throughput_"):]
            for name, entry in rec["cases"].items():
                entry = {**entry, "card": card, "source": os.path.basename(src)}
                if name == "dp-scaling":
                    entry["target"] = DP_TARGET
                    entry["meets_target"] = entry["scaling_2_vs_1"] >= DP_TARGET
                    merged["data_parallel"] = entry
                else:
                    key = name if tag in ("smollm2", "llama2_7b") else f"{name}@{tag}"
                    merged["single_gpu"][key] = entry
    if not found:
        return None
    write_json(path, merged)
    rows = ["Synthetic token ids (throughput does not depend on the text); the real trainer's jitted, "
            "sharded step; tokens/s = batch x seq_len / (seconds per optimizer step), timed after warm-up "
            "over back-to-back steps. Peak = the process's peak device memory (setup included).", "",
            "| case | model | mode | base | GPUs | batch x seq | ms/step | tokens/s | tokens/s/GPU | peak GiB "
            "| memory cap | card | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    entries = list(merged["single_gpu"].items())
    if merged.get("data_parallel"):
        entries.append(("dp-scaling", merged["data_parallel"]))
    for name, e in entries:
        base = f"W{e['quant']['bits']} g{e['quant']['group_size']}" if e.get("quant") else f"dense {e.get('dtype', '')}"
        cap = e["card"].get("memory_fraction")
        for run in e["runs"]:
            rows.append(f"| {name} | {e['model']} | {e['mode']} r{e['lora_rank']} | {base} | {run['devices']} | "
                        f"{run['global_batch']} x {run['seq_len']} | {run['seconds_per_step'] * 1e3:.1f} | "
                        f"{run['tokens_per_s']:,.0f} | {run['tokens_per_s_per_device']:,.0f} | "
                        f"{_gib(run.get('peak_bytes_device0'))} | "
                        f"{'-' if cap is None else f'{cap:.3f} x card'} | {e['card']['device']} | "
                        f"{str(e['card']['git_commit'])[:12]} |")
    dp = merged.get("data_parallel")
    rows.append("")
    if dp:
        rows.append(f"Data-parallel scaling, 1 -> 2 GPUs (same per-GPU batch): **{dp['scaling_2_vs_1']:.2f}x** "
                    f"(target {DP_TARGET}x: {'met' if dp['meets_target'] else 'NOT met'}).")
    else:
        rows.append("Data-parallel scaling 1 -> 2 GPUs: not measured yet (scripts/gpu/train_dp.sh).")
    versions = {e["card"]["versions"].get("jax") for _, e in entries if e["card"].get("versions")}
    rows.append(f"jax {', '.join(sorted(v for v in versions if v))}.")
    write_text(os.path.join(to, "train_throughput.md"), "\n".join(rows) + "\n")
    return path


def _folder(arg: str, tmp: str) -> str:
    if arg.endswith((".tgz", ".tar.gz")):
        with tarfile.open(arg) as tar:
            tar.extractall(tmp, filter="data")
        names = [n for n in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, n))]
        return os.path.join(tmp, sorted(names)[-1])
    if not os.path.isdir(arg):
        raise SystemExit(f"{arg}: not a folder or a .tgz")
    return arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="train/ and/or train_dp/ folders (or their .tgz)")
    p.add_argument("--to", default="docs/results")
    p.add_argument("--allow-smoke", action="store_true", help="record --tiny smoke runs too (checking only)")
    args = p.parse_args(argv)
    global ALLOW_SMOKE
    ALLOW_SMOKE = args.allow_smoke
    os.makedirs(args.to, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = [_folder(s, os.path.join(tmp, str(i))) for i, s in enumerate(args.sources)]
        for folder in folders:
            for sub in sorted(os.listdir(folder)):
                if sub.startswith("recovery") and os.path.isdir(os.path.join(folder, sub)):
                    out = record_recovery(folder, args.to, sub)
                    if out:
                        written.append(out)
        out = record_throughput(folders, args.to)
        if out:
            written.append(out)
    if not written:
        raise SystemExit(f"nothing to record in {', '.join(args.sources)} (no recovery/recovery.json, "
                         f"no throughput_*.json)")
    for path in written:
        print(f"wrote {path} and {os.path.splitext(path)[0]}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
