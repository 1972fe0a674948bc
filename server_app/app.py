"""Flower ServerApp entry: parse the run config once, make the run directory, run the method."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.codec import to_array_record
from common.config import ConfigError, parse_run_config
from common.foundation import (
    FoundationModelError,
    PromptFreeSegmenter,
    checkpoint_path,
    load_foundation_model,
    verify_checkpoint_sha256,
)
from common.models import build_model, count_parameters
from common.runtime import configure_threads, setup_logging
from server_app.board import MetricsBoard
from server_app.checkpoint import ResumeError, RunPaused, check_compatible, load_state, rewrite_history
from server_app.dsfedmed import DSFedMedStrategy
from server_app.fedavg import DeadlineFedAvg
from server_app.federation import Federation, FederationStopped
from server_app.progress import ServerProgress
from server_app.rundir import RunDirectory

log = logging.getLogger("dsfedmed.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging(log)
    try:
        cfg = parse_run_config(context.run_config)
    except ConfigError as exc:
        log.error("%s", exc)
        raise
    configure_threads(cfg.server_threads)
    resume = None
    if cfg.resume_from:
        try:
            resume = load_state(Path(cfg.resume_from))
            check_compatible(resume, cfg)
        except ResumeError as exc:
            log.error("%s", exc)
            raise
        rundir = RunDirectory(Path(cfg.resume_from).expanduser().resolve())
        rewrite_history(rundir.path, resume.history)
        log.info("resuming %s after round %d", rundir.path, resume.round)
    else:
        rundir = RunDirectory.create(cfg.runs_root, cfg.run_dir, cfg.method)
    print(f"DSFedMed run directory: {rundir.path}", flush=True)
    log.info("run directory: %s", rundir.path)
    rundir.write_json("config.json", {"run_config": cfg.to_flat()})

    if (
        cfg.method != "fedavg"
        and cfg.fm_checkpoint_sha256
        and (path := checkpoint_path(cfg.fm, cfg.fm_checkpoint))
    ):
        try:  # before any site spends time on the run
            verify_checkpoint_sha256(path, cfg.fm_checkpoint_sha256)
        except FoundationModelError as exc:
            log.error("%s", exc)
            raise
    torch.manual_seed(cfg.seed)  # the initial global model is part of what `seed` reproduces
    if cfg.tensorboard:
        rundir.board = MetricsBoard.open(rundir.path / "tensorboard")
    progress = ServerProgress()
    progress.start(cfg.num_rounds)
    fed = Federation(
        grid,
        progress=progress,
        link_mbps=cfg.link_mbps,
        state_key=resume.state_key if resume is not None else int(context.run_id),
    )
    if cfg.method == "fedfm":  # the global model is the FM itself (or its decoder)
        fm = load_foundation_model(cfg.fm, cfg.fm_checkpoint, "cpu", expected_sha256=cfg.fm_checkpoint_sha256)
        model = PromptFreeSegmenter(fm, cfg.fm_trainable).exchanged_module
        model_name = f"{cfg.fm} ({cfg.fm_trainable})"
    else:
        model = build_model(cfg.model)
        model_name = cfg.model
    log.info("method %s, model %s (%d parameters)", cfg.method, model_name, count_parameters(model))
    strategy_cls = DSFedMedStrategy if cfg.method == "dsfedmed" else DeadlineFedAvg
    strategy = strategy_cls(cfg, fed, rundir)
    strategy.resume = resume
    if cfg.method == "fedfm":
        strategy.require_same_model = False  # sites run the FM; their own site model is not used
    t0 = time.time()
    try:
        strategy.start(
            grid,
            to_array_record({k: v.numpy() for k, v in model.state_dict().items()}),
            num_rounds=cfg.num_rounds,
            timeout=cfg.round_timeout_s,
        )
    except RunPaused as paused:
        rundir.write_json(
            "summary.json",
            {
                "status": "paused",
                "method": cfg.method,
                "rounds": paused.round,
                "resume": f"flwr run . --run-config \"resume-from='{rundir.path}'\"",
                "bytes_total": fed.traffic.total_down + fed.traffic.total_up,
            },
        )
        log.info(
            "paused after round %d; continue with run config resume-from='%s'", paused.round, rundir.path
        )
        print(f"DSFedMed run paused after round {paused.round}: {rundir.path}", flush=True)
        return
    except FederationStopped as exc:
        rows = rundir.read_metrics()
        rundir.write_json(
            "summary.json",
            {
                "status": "stopped",
                "reason": str(exc),
                "method": cfg.method,
                "rounds": max((r["round"] for r in rows), default=0),
                "bytes_total": fed.traffic.total_down + fed.traffic.total_up,
                "wall_seconds": time.time() - t0,
            },
        )
        log.error("federation stopped: %s (see %s)", exc, rundir.path / "summary.json")
        raise
    finally:
        progress.stop()
        if rundir.board is not None:
            rundir.board.close()
    summary = {"run_dir": str(rundir.path), "model_params": count_parameters(model), **strategy.summary_data}
    summary["model"] = model_name
    rundir.write_json("config.json", {"run_config": cfg.to_flat(), "site_profiles": strategy.profiles})
    rundir.write_json("summary.json", summary)
    log.info(
        "done: test Dice mean %.3f (untrained %.3f), %.1f MB exchanged, %.0f s. Run directory: %s",
        summary["dice_test_mean"] or 0.0,
        summary["dice_test_initial_mean"] or 0.0,
        summary["bytes_total"] / 1e6,
        summary["wall_seconds"],
        rundir.path,
    )
    print(f"DSFedMed run finished: {rundir.path / 'summary.json'}", flush=True)
