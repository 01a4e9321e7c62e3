"""The accuracy-cost frontier: held-out perplexity against quantize time, ours vs the reference.

SmolLM2-135M-Instruct (fp32), sym, on identical BBC calibration windows (the reference runner's
``--calib-mode windows`` ids, handed to our worker as they are; see bench_vs_reference.py for the
remaining by-design differences). For each scheme and each iteration count, one process per run,
the sides interleaved:

- iters 0: ours plain RTN (``disable_opt_rtn``), ours optimized RTN (the iters-0 default), the
  reference's plain RTN (``disable_opt_rtn``) and the reference's optimized RTN (its default); with
  ``--mixed B ...`` also ours with ``avg_bits=B`` over ``--mixed-options`` (mixed bits) and the
  reference's AutoScheme at the same average over the same schemes (the reference passes its
  AutoRound data set to AutoScheme, which takes only a name or a file: that run reads the same
  calibration text through the reference's own loader, not the identical windows);
- iters > 0: ours plain (``enable_alg_ext=False``: the default until 2026-12-07), ours extended
  (``enable_alg_ext``, now the default), ours extended followed by the
  end-to-end scale tuning (``e2e_epochs``, side ``ours_e2e``), the reference plain and the
  reference with ``enable_alg_ext``.

Perplexity: the first ``--eval-windows`` 512-token windows of the BBC held-out split, fp32; ours on
the in-memory fake-quantized model, the reference on its saved ``fake`` folder. Writes
bench/results/frontier.json and, with matplotlib installed, frontier.png beside it.

    .venv/bin/python bench/bench_frontier.py                                  # everything (hours here)
    .venv/bin/python bench/bench_frontier.py --schemes W3G128 --iters 0       # optimized RTN only
    .venv/bin/python bench/bench_frontier.py --sides ours ref --iters 50      # one point per side
    .venv/bin/python bench/bench_frontier.py --quick                          # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (RESULTS, WORK, fmt, identical_windows, log, machine_info, parse_bench_args,  # noqa: E402
                     print_table, run_ours, run_ppl, run_reference, smollm2_dir, write_json)

NAME = "frontier"
SCHEMES = {"W4G128": (4, 128), "W3G128": (3, 128), "W2G64": (2, 64)}
SIDES = ("ours", "ours_ext", "ours_e2e", "ref", "ref_ext")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--iters", nargs="+", type=int, default=[0, 25, 50, 100, 200])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--e2e-epochs", type=int, default=2, help="side ours_e2e: the extended tuner, then this many "
                   "epochs of end-to-end scale tuning (e2e_epochs)")
    p.add_argument("--e2e-lr", type=float, default=None, help="side ours_e2e: e2e_lr (default: the library's)")
    p.add_argument("--disable-amp", action="store_true",
                   help="both sides tune in float32 even where the CPU has native bf16 (amp=False; the reference "
                        "otherwise casts the model to bf16); the figures taken on the AVX2-only machine were float32 "
                        "on both sides because amp had nothing to use there")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=42, help="tuning seed of both sides (the windows stay the same)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--mixed", nargs="*", type=float, default=[],
                   help="also ours with these avg_bits over --mixed-options (mixed bits) and the reference's "
                        "AutoScheme at the same average, at every iteration count")
    p.add_argument("--mixed-options", default="W2G64,W4G128")
    p.add_argument("--ext", nargs="*", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="with side ours_ext, also one run per value with these ExtendedTuner fields changed "
                        "(e.g. clip_max=1.5 outlier_fraction=0.001): each piece measured alone")
    p.add_argument("--only", nargs="*", default=[],
                   help="run only the variants whose label contains one of these strings (e.g. mixed AutoScheme)")
    return parse_bench_args(p, argv, NAME, "W4G128, iters 0 and 2, 4 samples of 64, ours only",
                            {"schemes": ["W4G128"], "iters": [0, 2], "nsamples": 4, "seqlen": 64,
                             "batch_size": 2, "eval_windows": 2, "sides": ["ours", "ours_ext"]})


def ref_options(options: str) -> str:
    """Our option names (``W2G64``, ``W4G128``) as the reference's presets (``W2A16G64``, ``W4A16``)."""
    out = []
    for o in options.split(","):
        bits, gs = o.strip().upper().lstrip("W").split("G")
        out.append(f"W{bits}A16" if gs == "128" else f"W{bits}A16G{gs}")
    return ",".join(out)


def parse_ext(text: str) -> Dict[str, Any]:
    """``"clip_max=1.5,outlier_fraction=0.001"`` as ExtendedTuner field overrides (bools, ints, floats)."""
    out: Dict[str, Any] = {}
    for part in text.split(","):
        key, sep, val = (x.strip() for x in part.partition("="))
        if not sep:
            raise SystemExit(f"--ext {text!r}: expected FIELD=VALUE, e.g. clip_max=1.5")
        if val.lower() in ("true", "false"):
            out[key] = val.lower() == "true"
        else:
            out[key] = int(val) if val.lstrip("-").isdigit() else float(val)
    return out


def _variants(side: str, iters: int, mixed: Sequence[float] = (), mixed_options: str = "",
              ext: Sequence[str] = (), e2e: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The runs of one side at one iteration count: (label, options[, ext_tuner overrides])."""
    if iters == 0:
        if side == "ours":
            return [{"label": "ours RTN", "opts": {"disable_opt_rtn": True}},
                    {"label": "ours opt-RTN", "opts": {}}] + \
                   [{"label": f"ours mixed {b:g} bits", "opts": {"avg_bits": b, "scheme_options": mixed_options}}
                    for b in mixed]
        if side == "ref":
            return [{"label": "ref RTN", "opts": {"disable_opt_rtn": True}},
                    {"label": "ref opt-RTN", "opts": {}}] + \
                   [{"label": f"ref AutoScheme {b:g} bits", "opts": {"avg_bits": b,
                                                                     "scheme_options": ref_options(mixed_options)}}
                    for b in mixed]
        return []  # the extended tuners are tuners: nothing to add at iters 0
    if side == "ours_e2e":
        return [{"label": "ours ext+e2e", "opts": {"enable_alg_ext": True, **(e2e or {"e2e_epochs": 2})}}]
    # "ours" is our plain tuner (enable_alg_ext=False; the library's default until 2026-12-07), "ref" the
    # reference's default, which is its plain tuner
    opts = {"ours": {"enable_alg_ext": False}, "ours_ext": {"enable_alg_ext": True}, "ref": {},
            "ref_ext": {"enable_alg_ext": True}}[side]
    runs = [{"label": {"ours": "ours", "ours_ext": "ours ext", "ref": "ref", "ref_ext": "ref alg_ext"}[side],
             "opts": opts}]
    if side == "ours_ext":
        runs += [{"label": f"ours ext {e}", "opts": {"enable_alg_ext": True}, "ext_tuner": parse_ext(e)} for e in ext]
    if side in ("ours", "ref"):  # mixed bits, tuned: the default tuner of each side over the plan
        runs += [{"label": f"{side} {'mixed' if side == 'ours' else 'AutoScheme'} {b:g} bits",
                  "opts": {"avg_bits": b, "scheme_options": mixed_options if side == "ours" else
                           ref_options(mixed_options)}} for b in mixed]
    return runs


def _plot(points: List[Dict[str, Any]], fp_ppl: float, path: Path) -> str:
    """This run's points drawn as :mod:`plot_frontier` draws the merged ones (every label on a curve)."""
    import plot_frontier

    drawn = [{**p, "curve": plot_frontier.curve_of(p["label"], pieces=True)} for p in points
             if p["ppl"] and p["seconds"]]
    if not drawn:
        return "no point with a perplexity and a time: no plot"
    try:
        return str(plot_frontier.plot(drawn, fp_ppl, path))
    except ImportError:
        return "matplotlib is not installed: no plot (make venv installs the [plot] extra)"


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_file, win_file, eval_file = identical_windows(work, tok, args.nsamples, args.seqlen, args.eval_windows,
                                                      args.eval_seqlen)
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size, "seed": args.seed,
                "ours_amp": not args.disable_amp, "ref_amp": not args.disable_amp,
                "sym": True, "calibration": "identical BBC windows", "eval_windows": args.eval_windows,
                "eval_seqlen": args.eval_seqlen}
    record: Dict[str, Any] = {"benchmark": NAME, "model": str(model_dir), "settings": settings,
                              "machine": machine_info(), "runs": {}, "points": []}
    fp = run_ppl(str(model_dir), eval_file, work, "fp")
    fp_ppl = fp.get("ppl")
    record["fp_ppl"] = fp_ppl
    log(f"FP ppl {fmt(fp_ppl, '.3f')}")
    failed = bool(fp.get("error"))
    e2e = {"e2e_epochs": args.e2e_epochs, **({} if args.e2e_lr is None else {"e2e_lr": args.e2e_lr})}
    rows = []
    for scheme in args.schemes:
        bits, gs = SCHEMES[scheme]
        for iters in args.iters:
            for side in args.sides:
                for v in _variants(side, iters, args.mixed, args.mixed_options, args.ext, e2e):
                    if args.only and not any(o in v["label"] for o in args.only):
                        continue
                    tag = f"{scheme}-it{iters}-{v['label'].replace(' ', '_').replace('=', '').replace(',', '_')}"
                    log(f"run {tag}")
                    if side.startswith("ours"):
                        opts = {"bits": bits, "group_size": gs, "sym": True, "iters": iters,
                                "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                                "seed": args.seed, "device": "cpu", **v["opts"]}
                        if args.disable_amp:
                            opts["amp"] = False
                        rec = run_ours({"job": "quantize", "kind": "llm", "model": str(model_dir),
                                        "model_dtype": "fp32", "options": opts, "calib_windows": str(win_file),
                                        "ppl_windows": str(eval_file), "ext_tuner": v.get("ext_tuner")}, work, tag)
                        ppl, seconds = rec.get("ppl"), rec.get("quantize_s")
                    else:
                        out_dir = work / f"{tag}-out"
                        rec = run_reference(str(model_dir), text_file, out_dir, work, tag, bits=bits, group_size=gs,
                                            sym=True, iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                                            batch_size=args.batch_size, seed=args.seed,
                                            disable_amp=args.disable_amp,
                                            **{k: (True if k in ("enable_alg_ext", "disable_opt_rtn") else val)
                                               for k, val in v["opts"].items()})
                        ppl_rec = run_ppl(str(out_dir), eval_file, work, f"{tag}-ppl") if "error" not in rec else rec
                        rec["ppl"] = ppl_rec.get("ppl")
                        ppl, seconds = rec.get("ppl"), rec.get("quantize_and_save_s")
                    failed |= bool(rec.get("error"))
                    record["runs"][tag] = rec
                    point = {"scheme": scheme, "iters": iters, "label": v["label"], "ppl": ppl,
                             "seconds": seconds, "increase": (ppl - fp_ppl) if ppl and fp_ppl else None}
                    record["points"].append(point)
                    log(f"  ppl {fmt(ppl, '.3f')} (+{fmt(point['increase'], '.2f')}), {fmt(seconds, '.1f')} s")
                    rows.append([scheme, iters, v["label"], fmt(ppl, ".3f"), fmt(point["increase"], ".2f"),
                                 fmt(seconds, ".1f")])
    title = (f"SmolLM2-135M-Instruct sym, BBC held-out ppl ({args.eval_windows} x {args.eval_seqlen}); FP "
             f"{fmt(fp_ppl, '.3f')}; calibration {args.nsamples} x {args.seqlen}, batch {args.batch_size}, seed {args.seed}")
    record["table"] = print_table(["scheme", "iters", "run", "ppl", "+ over FP", "quantize s"], rows, title)
    if fp_ppl:
        record["plot"] = _plot(record["points"], fp_ppl, (args.json or RESULTS / f"{NAME}.json").with_suffix(".png"))
        log(f"plot: {record['plot']}")
    write_json(NAME, record, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
