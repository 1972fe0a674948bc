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
from common.fileio import atomic_write_text
from common.foundation import PromptFreeSegmenter, load_foundation_model
from common.models import build_model, count_parameters
from common.runtime import configure_threads
from server_app.rundir import json_safe

# where a unit's files go: not part of what it measures, so a checkout elsewhere (another worktree,
# another machine) recognises the same units
_PATH_KEYS = ("run-dir", "runs-root", "pool-dir", "split-file", "data-root")


# run-config keys only DSFedMed reads (its pool, generators, teacher, selection and distillation):
# not part of a baseline unit's identity, so DSFedMed's recipe can change without re-running them
_DSFEDMED_KEYS = (
    "gen-", "pool-", "selection-", "fm-adapt-epochs", "fm-site-", "fm-epochs", "fm-prompt", "target-fm-weight",
    "kd-weight", "sup-weight", "temperature", "pos-weight", "logit-", "holdout-epochs", "exchange",
)  # fmt: skip
_FM_KEYS = ("fm-",)


def _reads(method: str, key: str) -> bool:
    if method == "dsfedmed":
        return True
    if key.startswith(_DSFEDMED_KEYS):
        return False
    return method == "fedfm" or not key.startswith(_FM_KEYS)


def _config_hash(cfg: dict) -> str:
    """What identifies a unit's configuration: the run config keys its method reads, without their
    paths, with the split file's content (the split itself) and the data folder's name in their place."""
    method = str(cfg.get("method", "local"))
    keep = {k: v for k, v in cfg.items() if k not in _PATH_KEYS and _reads(method, k)}
    if cfg.get("split-file"):
        keep["split"] = hashlib.sha256(Path(cfg["split-file"]).read_bytes()).hexdigest()
    if cfg.get("data-root"):
        keep["data"] = Path(cfg["data-root"]).name
    if cfg.get("pool-dir") == "":
        keep["pool-dir"] = ""  # an own pool (not the shared cached one) is part of the unit
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


_SCORE_KEYS = ("dice", "iou", "dice05", "iou05", "n")


def _site_scores(test: dict) -> dict:
    return {s: {k: v.get(k) for k in _SCORE_KEYS} for s, v in test.items()}


def _means(test: dict) -> dict:
    valid = [v for v in test.values() if v.get("n")]
    out = {}
    for k in ("dice", "iou", "dice05", "iou05"):
        vals = [v[k] for v in valid if v.get(k) is not None]
        out[f"{k}_test_mean"] = sum(vals) / len(vals) if vals else None
    return out


def _holdout(hold: dict | None) -> dict:
    hold = hold or {}
    return {
        "dice_holdout": hold.get("dice"),
        "iou_holdout": hold.get("iou"),
        "dice05_holdout": hold.get("dice05"),
        "iou05_holdout": hold.get("iou05"),
        "holdout_site": hold.get("site"),
    }


def floor_summary(floors: dict) -> dict:
    """Dice@0.5 of each floor (and the FM zero-shot reference) on the sites' test splits and the
    held-out hospital, and the best floor: what a unit's figures must be read against."""
    out = {
        name: {k: floors[name].get(k) for k in ("dice05_test_mean", "dice05_holdout", "dice_test_mean")}
        for name in ("untrained", "all-foreground", "all-background", "fm-zero-shot")
        if name in floors
    }
    out["best_floor"] = floors.get("best_floor")
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
        if r.get("dice_mean") is not None or r["round"] == 0:
            curve.append(
                {
                    "round": r["round"],
                    "dice_mean": r["dice_mean"],
                    "dice05_mean": r.get("dice05_mean"),
                    "bytes_cum": cum,
                }
            )
    test = _site_scores(summary["test"])
    rec.update(
        status="completed" if summary.get("status") == "completed" else summary.get("status", "unknown"),
        test=test,
        **_means(test),
        **_holdout(summary.get("holdout")),
        # the global model before training (fedfm-decoder: the FM zero-shot) on the same test splits
        dice05_test_round0=summary.get("dice05_test_initial_mean"),
        bytes_total=summary["bytes_total"],
        bytes_down=summary["bytes_down_total"],
        bytes_up=summary["bytes_up_total"],
        bytes_by_kind=summary.get("bytes_by_kind", {}),
        steps_private_per_site=summary.get("steps_private_per_site", {}),
        steps_distill_per_site=summary.get("steps_distill_per_site", {}),
        rounds=summary["rounds"],
        n_sites=len(summary["sites"]),
        server_seconds_per_round=(
            sum(r["seconds"] for r in rows[1:]) / max(len(rows) - 1, 1) if len(rows) > 1 else None
        ),
        setup_seconds=rows[0]["seconds"] if rows else None,
        curve=curve,
        model=summary.get("model"),
        extra={k: summary[k] for k in ("fm_eval", "pool") if k in summary},
    )
    if rows and rows[0].get("fm_site_rounds"):  # DSFedMed's teacher rounds at the sites (round 0's row)
        rec["extra"]["teacher_rounds"] = rows[0]["fm_site_rounds"]
    return rec


def _inprocess_record(res: dict, cfg, wall: float, peak_mb: float) -> dict:
    test = _site_scores(res["test"])
    return {
        "status": "completed",
        "details": "",
        "seconds_total": wall,
        "peak_rss_mb": peak_mb,
        "test": test,
        **_means(test),
        **_holdout(res["holdout"]),
        "bytes_total": 0,
        "bytes_down": 0,
        "bytes_up": 0,
        "bytes_by_kind": {},
        "steps_private_per_site": res.get("steps_private_per_site", {}),
        "steps_distill_per_site": {},
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
        units_dir: Path | None = None,
        seeds: set[int] | None = None,
    ):
        """``units_dir``: one JSON file per (variant, seed) and one for the floors, written as each
        finishes (the CLI keeps them beside the results, in the repository, so that an interrupted
        benchmark resumes and its table rebuilds from whatever units exist)."""
        self.profile = profile
        self.data_root = data_root
        self.work = work_dir.resolve()
        self.log = log
        self.only = only
        self.seeds = seeds  # run only these seeds now (the results still report every unit on disk)
        self.units_dir = (units_dir or self.work / "units").resolve()
        self.records_path = self.units_dir  # where the results are (for log lines)
        self.split_sizes: dict | None = None

    # --- bookkeeping -------------------------------------------------------------------------
    def load_records(self) -> list[dict]:
        """Every unit's record (the floors unit apart: :meth:`load_floors`)."""
        if not self.units_dir.is_dir():
            return []
        out = []
        for path in sorted(self.units_dir.glob("*.json")):
            if path.name == "floors.json":
                continue
            out.append(json.loads(path.read_text()))
        return out

    def current_records(self) -> list[dict]:
        """The units made with the profile's present configuration (a unit from an earlier recipe
        stays on disk but is not reported), plus the pool stage."""
        base = self.base_config()
        want = {
            (v.name, s): _config_hash(v.run_config(base, s))
            for v in self.profile.variants()
            for s in (v.seeds or self.profile.seeds)
        }
        out = []
        for r in self.load_records():
            if r.get("variant") == "pool-stage" or want.get((r.get("variant"), r.get("seed"))) == r.get(
                "config_hash"
            ):
                out.append(r)
            else:
                self.log(
                    f"unit {r.get('variant')}-s{r.get('seed')} was made with another configuration: not reported"
                )
        return out

    def load_floors(self) -> dict | None:
        path = self.units_dir / "floors.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _append(self, rec: dict) -> None:
        """Write one unit's record (a re-run of the same variant and seed replaces it), with the
        floors of the same splits beside its figures, so a unit file read alone is not misread."""
        self.units_dir.mkdir(parents=True, exist_ok=True)
        floors = self.load_floors()
        if floors is not None:
            rec = {**rec, "floors": floor_summary(floors)}
        name = f"{rec['variant']}-s{rec['seed']}.json"
        atomic_write_text(self.units_dir / name, json.dumps(json_safe(rec), indent=1) + "\n")

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
            if p.caps is not None or p.fractions is not None:
                self.split_sizes = write_capped_split(
                    self.data_root, split_path, p.image_size, p.caps, fractions=p.fractions
                )
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
            and (self.seeds is None or s in self.seeds)
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
        return self.current_records()

    def floors_key(self, base: dict, with_fm: bool) -> str:
        """What the floors depend on: the data (by name), its split (by content), the model, the FM and
        the seeds (not the rounds, nor where the files are)."""
        split = Path(base["split-file"]).read_text() if base.get("split-file") else ""
        keep = ("image-size", "model", "holdout-site", "fm", "fm-checkpoint", "phantom-images-per-site")
        ident = {
            **{k: base.get(k) for k in keep},
            "data": Path(base["data-root"]).name if base.get("data-root") else "",
            "split": hashlib.sha256(split.encode()).hexdigest(),
            "seeds": list(self.profile.seeds),
            "with-fm": with_fm,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def run_floors(self, with_fm: bool = True) -> dict:
        """The floors unit (untrained at every seed, all-foreground, all-background, the FM
        zero-shot and the FM's box-from-mask oracle), computed once per split and config."""
        from bench.floors import compute_floors

        self.work.mkdir(parents=True, exist_ok=True)
        base = self.base_config()
        key = self.floors_key(base, with_fm)
        have = self.load_floors()
        if have is not None and have.get("config_hash") == key:
            return have
        self.log(
            "floors: untrained, all-foreground, all-background"
            + (", FM zero-shot, oracle" if with_fm else "")
        )
        t0 = time.time()
        floors = compute_floors(
            parse_run_config(base), self.profile.num_sites, self.profile.seeds, with_fm=with_fm, log=self.log
        )
        floors.update(config_hash=key, seconds_total=time.time() - t0)
        floors["floors"] = floor_summary(floors)  # the same summary every unit file carries
        self.units_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.units_dir / "floors.json", json.dumps(json_safe(floors), indent=1) + "\n")
        return floors

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
                # measured by the server per message kind: the generator uploads are the "generator"
                # share, charged to every DSFedMed run that reuses this pool
                "bytes_by_kind": json.loads((run_dir / "summary.json").read_text()).get("bytes_by_kind", {}),
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
        if rec["status"] == "completed" and v.method.startswith("dsfedmed") and self.profile.meaningful:
            rec.setdefault("extra", {})["fm_eval"] = self._teacher_scores(cfg, run_dir)
        self._finish(v, seed, cfg, run_dir, rec)

    def _teacher_scores(self, cfg: dict, run_dir: Path) -> dict:
        """The DSFedMed teacher measured on the sites' test splits and the held-out hospital:
        zero-shot (shipped decoder), after adaptation on the pool (before round 1), at the end."""
        from bench.floors import eval_parts, fm_decoder_scores

        run = parse_run_config(cfg)
        parts = eval_parts(run, self.profile.num_sites)
        out: dict = {}
        for label, name in (
            ("zero_shot", None),
            ("adapted", "fm_decoder_adapted.pt"),
            ("end", "fm_decoder_final.pt"),
        ):
            decoder = None
            if name is not None:
                path = run_dir / "checkpoints" / name
                if not path.is_file():
                    continue
                payload = torch.load(path, map_location="cpu", weights_only=True)
                decoder = {k: v.numpy() for k, v in payload["state_dict"].items()}
            sc = fm_decoder_scores(run, parts, decoder, log=self.log)
            out[f"fm_dice05_test_{label}"] = sc["dice05_test_mean"]
            out[f"fm_dice05_holdout_{label}"] = sc["dice05_holdout"]
        return out

    def _run_inprocess(self, v: Variant, seed: int, base: dict) -> None:
        cfg_dict = v.run_config(base, seed)
        cfg = parse_run_config(cfg_dict)
        self.log(f"{v.name} seed {seed}: in-process ({v.kind}, not federated)")
        configure_threads(cfg.num_threads)  # as one simulated site: num-threads (default 1)
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
                f"  -> test Dice@0.5 {rec['dice05_test_mean']:.3f} (threshold-averaged "
                f"{rec['dice_test_mean']:.3f}), held-out "
                f"{'n/a' if rec['dice05_holdout'] is None else format(rec['dice05_holdout'], '.3f')}, "
                f"{rec['bytes_total'] / 1e6:.2f} MB, {rec['seconds_total']:.0f} s"
            )
        else:
            self.log(f"  -> {rec['status']}: {rec['details'][:400]}")
