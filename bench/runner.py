"""Run a profile: every (variant, seed) once, each result appended to ``runs.jsonl`` as it lands
(an interrupted benchmark resumes where it stopped), then aggregate into the results files."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.baselines import run_central, run_local
from bench.data import REPO, write_capped_split
from bench.flower_sim import flwr_run, simulation_superlink
from bench.measure import PeakMemory, inference_ms
from bench.profiles import Profile, Variant
from common.config import parse_run_config
from common.foundation import PromptFreeSegmenter, load_foundation_model
from common.models import build_model, count_parameters
from common.runtime import configure_threads


def _config_hash(cfg: dict) -> str:
    keep = {k: v for k, v in cfg.items() if k not in ("run-dir",)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def measure_inference(profile: Profile, fm_repeats: int = 5, site_repeats: int = 30) -> dict:
    """Site-model and FM milliseconds per image, batch 1, one CPU thread (as each simulated site)."""
    configure_threads(1)
    cfg = parse_run_config({"image-size": profile.image_size, **profile.extra})
    torch.manual_seed(0)
    site_model = build_model(cfg.model)
    fm = PromptFreeSegmenter(
        load_foundation_model(cfg.fm, cfg.fm_checkpoint, "cpu", expected_sha256=cfg.fm_checkpoint_sha256)
    )
    out = {
        "site_model": cfg.model,
        "site_params": count_parameters(site_model),
        "site_infer_ms": inference_ms(site_model, profile.image_size, site_repeats),
        "fm": cfg.fm,
        "fm_params": fm.fm.num_parameters(),
        "fm_infer_ms": inference_ms(fm, profile.image_size, fm_repeats, warmup=1),
        "how": f"median of repeats, batch 1, CPU, 1 torch thread, {profile.image_size} px input "
        "(the FM resizes to its own input size and is prompted with the whole-image box)",
    }
    configure_threads(2)
    return out


def _flower_record(run_dir: Path, wall: float, peak_mb: float, status: str, details: str) -> dict:
    rec: dict = {
        "status": status,
        "details": details,
        "seconds_total": wall,
        "peak_rss_mb": peak_mb,
        "peak_rss_scope": "process tree",  # records without it summed one process group only
    }
    summary_path = run_dir / "summary.json"
    if not status.endswith("completed") or not summary_path.is_file():
        return rec
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cum, curve = 0, []
    for r in rows:
        cum += r["bytes_down"] + r["bytes_up"]
        curve.append({"round": r["round"], "dice_mean": r["dice_mean"], "bytes_cum": cum})
    hold = summary.get("holdout") or {}
    rec.update(
        status="completed" if summary.get("status") == "completed" else summary.get("status", "unknown"),
        test={s: {"dice": v["dice"], "iou": v["iou"], "n": v["n"]} for s, v in summary["test"].items()},
        dice_test_mean=summary["dice_test_mean"],
        iou_test_mean=summary["iou_test_mean"],
        dice_holdout=hold.get("dice"),
        iou_holdout=hold.get("iou"),
        holdout_site=hold.get("site"),
        bytes_total=summary["bytes_total"],
        bytes_down=summary["bytes_down_total"],
        bytes_up=summary["bytes_up_total"],
        rounds=summary["rounds"],
        n_sites=len(summary["sites"]),
        server_seconds_per_round=(
            sum(r["seconds"] for r in rows[1:]) / max(len(rows) - 1, 1) if len(rows) > 1 else None
        ),
        setup_seconds=rows[0]["seconds"] if rows else None,
        curve=curve,
        model=summary.get("model"),
    )
    return rec


def _inprocess_record(res: dict, cfg, wall: float, peak_mb: float) -> dict:
    test = {s: {"dice": v["dice"], "iou": v["iou"], "n": v["n"]} for s, v in res["test"].items()}
    valid = [v for v in test.values() if v["n"] > 0]
    hold = res["holdout"] or {}
    return {
        "status": "completed",
        "details": "",
        "seconds_total": wall,
        "peak_rss_mb": peak_mb,
        "test": test,
        "dice_test_mean": sum(v["dice"] for v in valid) / len(valid),
        "iou_test_mean": sum(v["iou"] for v in valid) / len(valid),
        "dice_holdout": hold.get("dice"),
        "iou_holdout": hold.get("iou"),
        "holdout_site": hold.get("site"),
        "bytes_total": 0,
        "bytes_down": 0,
        "bytes_up": 0,
        "rounds": cfg.num_rounds,
        "n_sites": len(test),
        "server_seconds_per_round": None,
        "setup_seconds": None,
        "curve": [{**c, "bytes_cum": 0} for c in res["curve"]],
        "model": cfg.model,
    }


class BenchRunner:
    def __init__(
        self,
        profile: Profile,
        data_root: Path | None,
        work_dir: Path,
        log: Callable[[str], None] = print,
        only: set[str] | None = None,
    ):
        self.profile = profile
        self.data_root = data_root
        self.work = work_dir.resolve()
        self.log = log
        self.only = only
        self.records_path = self.work / "runs.jsonl"

    # --- bookkeeping -------------------------------------------------------------------------
    def load_records(self) -> list[dict]:
        if not self.records_path.is_file():
            return []
        return [json.loads(x) for x in self.records_path.read_text().splitlines() if x.strip()]

    def _append(self, rec: dict) -> None:
        with open(self.records_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def base_config(self) -> dict:
        p = self.profile
        split_file = ""
        if p.data == "polypgen":
            if self.data_root is None or not self.data_root.is_dir():
                raise FileNotFoundError(
                    f"profile {p.name!r} needs the PolypGen folder (one sub-folder per hospital); "
                    f"not found at {self.data_root} (set --data-root or $DSFEDMED_POLYPGEN)"
                )
            split_path = self.work / "split.json"
            if p.caps is not None:
                self.split_sizes = write_capped_split(self.data_root, split_path, p.image_size, p.caps)
                split_file = str(split_path)
        base = p.base_run_config(
            str(self.data_root) if p.data == "polypgen" else "", split_file, str(self.work / "pool")
        )
        base["runs-root"] = str(self.work / "runs")
        parse_run_config(base)  # fail here, with the key named, not inside the first run
        return base

    # --- running ---------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        p = self.profile
        self.work.mkdir(parents=True, exist_ok=True)
        self.split_sizes: dict | None = None
        base = self.base_config()
        done = {
            (r["variant"], r["seed"], r["config_hash"])
            for r in self.load_records()
            if r["status"] == "completed"
        }
        todo = [
            (v, s)
            for v in p.variants()
            for s in (v.seeds or p.seeds)
            if (self.only is None or v.name in self.only)
            and (v.name, s, _config_hash(v.run_config(base, s))) not in done
        ]
        self.log(f"profile {p.name}: {len(todo)} run(s) to do, results in {self.records_path}")
        flower = [t for t in todo if t[0].kind == "flower"]
        if flower:
            with simulation_superlink(self.work / "flwr-home", REPO) as link:
                if any(v.method.startswith("dsfedmed") for v, _ in flower):
                    self._pool_stage(link, base)
                for v, s in flower:
                    self._run_flower(link, v, s, base)
        for v, s in todo:
            if v.kind != "flower":
                self._run_inprocess(v, s, base)
        return self.load_records()

    def _pool_stage(self, link, base: dict) -> None:
        """Build the synthetic pool (site generators, sampling) and the FM's embeddings once: a
        one-round DSFedMed run whose pool-dir every later DSFedMed run reuses."""
        pool_dir = Path(base["pool-dir"])
        if (pool_dir / "pool.npz").is_file() and list(pool_dir.glob("fm-embeddings-*.pt")):
            return
        cfg = {**base, "method": "dsfedmed", "num-rounds": 1, "seed": 0}
        run_dir = self.work / "runs" / "pool-stage"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg["run-dir"] = str(run_dir)
        self.log("pool stage: site generators, synthetic pool and FM embeddings (once)")
        t0 = time.time()
        out = flwr_run(link, REPO, cfg, self.profile.num_sites, timeout_s=self.profile.run_timeout_s * 2)
        if not out.status.endswith("completed"):
            raise RuntimeError(f"pool stage failed ({out.status}: {out.details}); see {run_dir}")
        self._append(
            {
                "variant": "pool-stage",
                "seed": 0,
                "status": "completed",
                "config_hash": _config_hash(cfg),
                "seconds_total": time.time() - t0,
                "run_dir": str(run_dir),
            }
        )

    def _run_flower(self, link, v: Variant, seed: int, base: dict) -> None:
        cfg = v.run_config(base, seed)
        run_dir = self.work / "runs" / f"{v.name}-s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg["run-dir"] = str(run_dir)
        self.log(f"{v.name} seed {seed}: flwr run ({self.profile.num_sites} simulated sites)")
        t0 = time.time()
        with PeakMemory(link.pid) as mem:
            try:
                out = flwr_run(link, REPO, cfg, self.profile.num_sites, timeout_s=self.profile.run_timeout_s)
                status, details = out.status, out.details
            except Exception as exc:  # noqa: BLE001 - one failed run is recorded, the bench goes on
                status, details = "failed", f"{type(exc).__name__}: {str(exc)[-1500:]}"
        rec = _flower_record(run_dir, time.time() - t0, mem.peak_mb, status, details)
        self._finish(v, seed, cfg, run_dir, rec)

    def _run_inprocess(self, v: Variant, seed: int, base: dict) -> None:
        cfg_dict = v.run_config(base, seed)
        cfg = parse_run_config(cfg_dict)
        self.log(f"{v.name} seed {seed}: in-process ({v.kind}, not federated)")
        configure_threads(2)
        t0 = time.time()
        with PeakMemory() as mem:
            fn = run_local if v.kind == "local" else run_central
            res = fn(cfg, self.profile.num_sites)
        rec = _inprocess_record(res, cfg, time.time() - t0, mem.peak_mb)
        self._finish(v, seed, cfg_dict, None, rec)

    def _finish(self, v: Variant, seed: int, cfg: dict, run_dir: Path | None, rec: dict) -> None:
        rec = {
            "variant": v.name,
            "method": v.method,
            "seed": seed,
            "config_hash": _config_hash(cfg),
            "run_dir": str(run_dir) if run_dir else None,
            **rec,
        }
        self._append(rec)
        if rec["status"] == "completed":
            self.log(
                f"  -> test Dice {rec['dice_test_mean']:.3f}, holdout "
                f"{'n/a' if rec['dice_holdout'] is None else format(rec['dice_holdout'], '.3f')}, "
                f"{rec['bytes_total'] / 1e6:.2f} MB, {rec['seconds_total']:.0f} s"
            )
        else:
            self.log(f"  -> {rec['status']}: {rec['details'][:400]}")
