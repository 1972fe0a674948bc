"""Long site steps say how far they are in the SuperNode's log."""

import logging

from client_app.trainer import _EpochLog


def test_epoch_log_throttles_and_names_the_site(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 20.0, 21.0, 40.0])
    monkeypatch.setattr("client_app.trainer.time.monotonic", lambda: next(clock))
    p = _EpochLog("h1", "local training", epochs=3, every_s=10.0)  # starts at t=0
    with caplog.at_level(logging.INFO, logger="dsfedmed.client"):
        p.epoch(1, 0.5, 4)  # t=1: too soon
        p.epoch(2, 0.4, 8)  # t=20: logged
        p.epoch(3, 0.3, 12)  # t=21: last epoch of a long step: logged
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "h1: local training epoch 2/3, loss 0.4000, 8 steps, 20 s",
        "h1: local training epoch 3/3, loss 0.3000, 12 steps, 21 s",
    ]
