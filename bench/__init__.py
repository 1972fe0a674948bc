"""Benchmark harness: DSFedMed against its baselines on the same data, splits, seeds and budget.

``dsfedmed bench run --profile quick|full`` (see README "Benchmark"). Federated methods run the real
ServerApp/ClientApp through Flower's simulation runtime; ``local`` and ``central`` (not federated)
run the same :class:`client_app.trainer.SiteTrainer` in this process.
"""
