"""Checkpoints across tools: GPTQModel's and AutoAWQ's files in our loader, ours in GPTQModel (issue 8).

    make peers-venv                              # .venv-peers: GPTQModel 7.7, optimum, AutoAWQ 0.2.9
    .venv/bin/python bench/bench_peers.py        # about 25 min on 2 cores
    .venv/bin/python bench/bench_peers.py --quick   # the tiny Llama only

Part 1, **they write, we read**: GPTQModel quantizes on CPU (random-token calibration) the tiny random Llama in
nine variants (GPTQ v1 sym and asym, act-order ``desc_act=True``, ``dynamic`` rules keeping one layer in full
precision and putting others at 8 bits, the ``gptq_v2`` layout, 2, 3 and 8 bits, and ``lm_head=True``), the tiny
random Qwen2-VL of the tests (its language model; text conversations as calibration) and SmolLM2-135M (GPTQ v1 and AWQ GEMM, group 64);
AutoAWQ quantizes SmolLM2 (GEMM, asym, group 64). Their folders are read back by ``GPTQModel.load`` (AutoAWQ's own
loader needs intel-extension-for-pytorch on CPU).
Part 2, **we write, they read**: our ``auto_gptq`` and ``auto_awq`` exports of SmolLM2 (W4G64 sym RTN), read by
``GPTQModel.load`` and, for ``auto_gptq``, by transformers' ``from_pretrained`` (which hands GPTQ to gptqmodel
through optimum).

Each folder is read by both sides (ours with the ``torch`` backend) twice: in fp16 for the weights (GPTQModel's
torch kernel runs fp16 and bf16 only; fp16 holds the fp16 scales exactly, so a dequantization computed right
rounds once) and in bf16 for the logits (AutoAWQ's SmolLM2 overflows fp16 to NaN in both readers). Compared:
every quantized layer's weight as each module computes it (``layer(I)``, exact in fp16), as the largest
difference relative to the layer's largest weight and the share of bit-identical elements, and the logits on
2 x 32 random tokens (largest difference, how often the top token agrees, and where it does not, the gap between
the two tokens in GPTQModel's logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, _timed_job, fmt, log, machine_info, parse_bench_args, print_table,  # noqa: E402
                     smollm2_dir, tiny_llama_dir, write_json)

NAME = "peers"
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEER_CHILD = Path(__file__).resolve().parent / "_peer_child.py"

G32 = {"bits": 4, "group_size": 32, "desc_act": False}
# name -> (writer, model, its quantize config)
WRITTEN_BY_PEERS = {
    "tiny-gptq-sym": ("gptqmodel", "tiny", G32),
    "tiny-gptq-asym": ("gptqmodel", "tiny", {**G32, "sym": False}),
    "tiny-gptq-act-order": ("gptqmodel", "tiny", {**G32, "desc_act": True, "act_group_aware": False}),
    "tiny-gptq-dynamic": ("gptqmodel", "tiny", {**G32, "dynamic": {r"-:.*\.1\.mlp\.down_proj": {},
                                                                  r"+:.*\.0\.self_attn\..*": {"bits": 8,
                                                                                               "group_size": 64}}}),
    "tiny-gptq-v2": ("gptqmodel", "tiny", {**G32, "format": "gptq_v2"}),
    "tiny-gptq-w2": ("gptqmodel", "tiny", {**G32, "bits": 2}),
    "tiny-gptq-w3": ("gptqmodel", "tiny", {**G32, "bits": 3}),  # 32 codes in 3 words, across word boundaries
    "tiny-gptq-w8": ("gptqmodel", "tiny", {**G32, "bits": 8}),
    "tiny-gptq-lm-head": ("gptqmodel", "tiny", {**G32, "lm_head": True}),
    "smollm2-gptq-g64": ("gptqmodel", "smollm2", {"bits": 4, "group_size": 64, "desc_act": False}),
    "smollm2-awq-g64": ("gptqmodel", "smollm2", {"bits": 4, "group_size": 64, "quant_method": "awq",
                                                 "format": "gemm"}),
    "tiny-qwen2vl-gptq": ("gptqmodel", "qwen2vl", G32),  # a VLM: GPTQModel writes no block_name_to_quantize
    "smollm2-autoawq-asym-g64": ("autoawq", "smollm2", {"zero_point": True, "q_group_size": 64, "w_bit": 4,
                                                        "version": "GEMM"}),
}
# name -> (our export format, readers on the peers' side). GPTQModel hands auto_round folders to the auto-round
# library (the reference), so ours are read through the GPTQ and AWQ exports.
WRITTEN_BY_US = {
    "ours-auto_gptq": ("auto_gptq", ("gptqmodel", "hf")),
    "ours-auto_awq": ("auto_awq", ("gptqmodel",)),
}


def run_peer(spec: Dict[str, Any], work: Path, name: str) -> Dict[str, Any]:
    """One job of ``_peer_child.py`` in ``.venv-peers``; its record (``error`` on failure)."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    rec = _timed_job([str(PEER_PYTHON), str(PEER_CHILD), str(spec_path), str(out_path)], out_path, log_path, 1800,
                     failed="GPTQModel job")
    if "error" in rec:
        log(f"  {name}: {rec['error']} (log: {log_path})")
    return rec


def ours_probe(folder: Path, ids) -> Dict[str, Any]:
    """What our loader makes of ``folder``: logits and each quantized layer's weight, as :func:`_peer_child.probe`."""
    import torch

    from auto_round.inference import load_quantized
    from auto_round.inference.qlinear import QuantLinear

    out: Dict[str, Any] = {"weights": {}}
    with torch.no_grad():
        out["logits"] = load_quantized(str(folder), backend="torch", dtype=torch.bfloat16)(input_ids=ids).logits.float()
        model = load_quantized(str(folder), backend="torch", dtype=torch.float16)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                w = m(torch.eye(m.in_features, dtype=torch.float16))
                if m.bias is not None:
                    w = w - m.bias.to(w.dtype)
                out["weights"][name] = w.t().float().contiguous()
    return out


def compare(ours: Dict[str, Any], theirs: Dict[str, Any]) -> Dict[str, Any]:
    """Layer weights and logits of the two readings of one folder."""
    import torch

    names_o, names_t = set(ours["weights"]), set(theirs["weights"])
    rel, identical, total = 0.0, 0, 0
    for n in sorted(names_o & names_t):
        a, b = ours["weights"][n], theirs["weights"][n]
        if a.shape != b.shape:
            return {"error": f"layer {n}: shape {tuple(a.shape)} (ours) vs {tuple(b.shape)}"}
        rel = max(rel, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
        identical += int((a == b).sum())
        total += a.numel()
    lo, lt = ours["logits"], theirs["logits"]
    top_o, top_t = lo.argmax(-1), lt.argmax(-1)
    differ = top_o != top_t
    # where the top tokens differ: how far apart the two tokens are in GPTQModel's own logits (a near-tie is small)
    margins = (lt.gather(-1, top_t.unsqueeze(-1)) - lt.gather(-1, top_o.unsqueeze(-1))).squeeze(-1)[differ]
    return {"top1_disagreement_max_margin": float(margins.max()) if margins.numel() else None,
            "layers_ours": len(names_o), "layers_theirs": len(names_t),
            "layers_only_one_side": sorted(names_o ^ names_t)[:8],
            "weight_max_rel_diff": rel, "weight_identical_share": identical / max(total, 1),
            "logits_max_abs_diff": float((lo - lt).abs().max()), "logits_scale": float(lt.abs().max()),
            "top1_agreement": float((lo.argmax(-1) == lt.argmax(-1)).float().mean())}


def tiny_vlm_dir(family: str) -> Path:
    """A tiny random VLM of the test suite (``tests/tiny_vlms.py``) saved with its processor."""
    folder = ROOT / ".cache" / "bench" / "models" / f"tiny-{family}"
    if (folder / ".complete").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_vlms import FAMILIES

    vlm = FAMILIES[family]()
    for part in (vlm.model, vlm.processor, vlm.tokenizer):
        part.save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return folder


def _model_dir(kind: str) -> Path:
    return {"tiny": tiny_llama_dir, "smollm2": smollm2_dir, "qwen2vl": lambda: tiny_vlm_dir("qwen2_vl")}[kind]()


def _ids(work: Path, vocab: int):
    import torch

    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    path = work / f"ids_{vocab}.pt"
    torch.save(ids, path)
    return ids, path


def written_by_peers(names: Sequence[str], work: Path) -> List[Dict[str, Any]]:
    import torch

    rows = []
    for name in names:
        tool, kind, config = WRITTEN_BY_PEERS[name]
        vocab = 20000 if kind == "smollm2" else 500
        ids, ids_path = _ids(work, vocab)
        folder = work / name
        log(f"{name}: {tool} quantizes {kind} with {config}")
        q = run_peer({"job": "quantize", "tool": tool, "model": str(_model_dir(kind)), "out": str(folder),
                      "config": config, "calib": {"n": 16, "len": 64, "vocab": vocab, "seed": 0,
                                                  "chat": kind == "qwen2vl"}}, work,
                     f"{name}.quantize")
        row: Dict[str, Any] = {"case": name, "writer": tool, "config": config, "quantize": q}
        if "error" not in q:
            t = run_peer({"job": "probe", "folder": str(folder), "loader": "gptqmodel", "ids": str(ids_path),
                          "tensors": str(work / f"{name}.gptqmodel.pt")}, work, f"{name}.probe")
            row["theirs"] = t
            if "error" not in t:
                try:
                    row["compare"] = compare(ours_probe(folder, ids), torch.load(work / f"{name}.gptqmodel.pt"))
                except Exception as err:  # our loader's failure is the finding
                    row["compare"] = {"error": f"our loader: {type(err).__name__}: {err}"}
        rows.append(row)
        log(f"  {name}: {row.get('compare', row.get('theirs', q))}")
    return rows


def written_by_us(names: Sequence[str], work: Path) -> List[Dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round import AutoRound

    rows = []
    src = smollm2_dir()
    ids, ids_path = _ids(work, 20000)
    for name in names:
        fmt_name, loaders = WRITTEN_BY_US[name]
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        ar = AutoRound(model, AutoTokenizer.from_pretrained(src), bits=4, group_size=64, sym=True, iters=0,
                       disable_opt_rtn=True)
        folder = ar.quantize_and_save(work / name, format=fmt_name)[0]
        ours = ours_probe(folder, ids)
        for loader in loaders:
            row: Dict[str, Any] = {"case": name, "writer": "ours", "format": fmt_name, "reader": loader}
            t = run_peer({"job": "probe", "folder": str(folder), "loader": loader, "ids": str(ids_path),
                          "tensors": str(work / f"{name}.{loader}.pt")}, work, f"{name}.{loader}")
            row["theirs"] = t
            if "error" not in t:
                row["compare"] = compare(ours, torch.load(work / f"{name}.{loader}.pt"))
            rows.append(row)
            log(f"  {name} read by {loader}: {row.get('compare', t.get('error'))}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=None, help="case names (default: all); "
                   f"{sorted(WRITTEN_BY_PEERS) + sorted(WRITTEN_BY_US)}")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench" / "peers")
    args = parse_bench_args(p, argv, NAME, "the tiny-Llama GPTQModel cases only",
                            {"cases": [n for n in WRITTEN_BY_PEERS if n.startswith("tiny")]})
    if not PEER_PYTHON.exists():
        print(f"SKIPPED: {PEER_PYTHON} is missing; GPTQModel runs in its own venv (not .venv): make peers-venv")
        return 0
    cases = args.cases or list(WRITTEN_BY_PEERS) + list(WRITTEN_BY_US)
    unknown = [c for c in cases if c not in WRITTEN_BY_PEERS and c not in WRITTEN_BY_US]
    if unknown:
        p.error(f"unknown case(s) {unknown}; valid: {sorted(WRITTEN_BY_PEERS) + sorted(WRITTEN_BY_US)}")
    args.work = args.work.resolve()  # the GPTQModel jobs run in it
    args.work.mkdir(parents=True, exist_ok=True)
    rows = written_by_peers([c for c in cases if c in WRITTEN_BY_PEERS], args.work)
    rows += written_by_us([c for c in cases if c in WRITTEN_BY_US], args.work)
    table = []
    for r in rows:
        c = r.get("compare", {})
        err = c.get("error") or r.get("theirs", {}).get("error") or r.get("quantize", {}).get("error")
        table.append([r["case"], r["writer"], r.get("reader", "ours") if r["writer"] == "ours" else "ours",
                      "FAILED: " + err[:60] if err else "ok", c.get("layers_ours"), c.get("layers_theirs"),
                      fmt(c.get("weight_max_rel_diff"), ".1e"), fmt(c.get("weight_identical_share"), ".4f"),
                      fmt(c.get("logits_max_abs_diff"), ".3f"), fmt(c.get("top1_agreement"), ".3f"),
                      fmt(c.get("top1_disagreement_max_margin"), ".3f")])
    print_table(["case", "writer", "reader", "result", "layers (ours)", "layers (GPTQModel)", "weight max rel diff",
                 "weights identical", "logits max diff", "top-1 agree", "margin where not"], table,
                "GPTQModel 7.7 / AutoAWQ 0.2.9 and auto_round on each other's checkpoints "
                "(weights in fp16, logits in bf16, both sides)")
    write_json(NAME, {"machine": machine_info(), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
