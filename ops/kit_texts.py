"""The text files of a site kit (node config, policy, compose variables, README), from what
``dsfedmed provision`` decided; no keys, no file writing here."""

from __future__ import annotations

import re

from common.config import NodeConfig
from deploy.processes import toml_value


def node_config_toml(node: NodeConfig, site: str) -> str:
    fields = {
        "site-name": ("this site's name in the federation (logs, metrics, run directory)", node.site_name),
        "data-dir": ("this site's folder with images/ and masks/ (matching file stems)", node.data_dir),
        "model": ("the site's MONAI model; empty = the run's model", node.model),
        "state-dir": ("where the site keeps its model, pool cache and audit log", node.state_dir),
        "audit-log": ("JSON lines, one per reply this site sends; 'off' = none", node.audit_log),
        "policy-file": ("what this site agrees to send (policy.toml in this kit)", node.policy_file),
    }
    lines = [
        f"# SuperNode node config of site {site} (flower-supernode --node-config node-config.toml).",
        "# Paths are as seen at the site. Other keys: device ('auto', 'cpu', 'cuda'), num-threads, cache-dir.",
        "",
    ]
    for key, (doc, value) in fields.items():
        lines += [f"# {doc}", f"{key} = {toml_value(value)}"]
    return "\n".join(lines) + "\n"


POLICY_TOML = """\
# Site policy of {site}: what this site agrees to do and send. Read by the site's ClientApp
# (node config policy-file). Every default below is permissive; tighten it, then restart the SuperNode.

# message types this site answers; anything else is refused with a reason the server logs
# (train.teacher: the FM's mask decoder, fine-tuned on this site's images, goes back to the server)
allowed-message-types = ["query.profile", "train", "evaluate", "train.generator", "evaluate.pool",
                         "train.teacher"]

# the largest reply this site sends, in bytes (0 = no limit)
max-reply-bytes = 0

# the largest request this site decodes (array bytes: weights, synthetic pool, soft targets), set by
# the site whatever the coordinator's run config says (0 = no limit)
max-request-bytes = 1073741824

# whether this site trains a diffusion generator and sends its weights (pool-source 'generator');
# false refuses train.generator (the server then falls back to another pool source)
allow-generator-upload = true

# whether this site sends model weights (method 'fedavg'/'fedfm', exchange 'weights'/'hybrid');
# false leaves only the logits exchange
allow-weights-upload = true

# differential privacy of what the site sends (clip each update to `clip`, add Gaussian noise with
# noise-multiplier x clip, account (epsilon, delta)); max-epsilon = 0.0 means no budget limit
[dp]
enabled = false
clip = 1.0
noise-multiplier = 1.0
delta = 1e-5
max-epsilon = 0.0

# DP-SGD (opacus) when the site trains its diffusion generator
[generator-dp]
enabled = false
noise-multiplier = 1.0
max-grad-norm = 1.0
delta = 1e-5

# scoring at the server's request: each evaluate request scores weights the server chose on this
# site's labelled images. Which splits it may ask for ("val", "test"; "all" = every image, for a
# site held out of training) and how many requests one Flower run may make (0 = no limit)
[evaluate]
splits = ["val", "test"]
max-requests-per-run = 100
"""


def site_env(site: str, address: str, install: str, data_dir: str) -> str:
    """The kit's ``site.env``: the docker compose variables of this site."""
    from importlib.metadata import version

    lines = [
        f"# docker compose variables of site {site} (names as in docker/compose.yml and docker/.env.example)",
        f"FLWR_VERSION={version('flwr')}",
        "# cpu, or a CUDA tag such as cu128 with docker/compose.gpu.yml",
        "TORCH_VARIANT=cpu",
        f"SITE_NAME={site}",
        f"SUPERLINK_ADDRESS={address}",
        "# this kit at the site (its ca.pem and node.key are mounted read-only into the SuperNode)",
        f"KIT_DIR={install}",
        "# the site's image/mask folder; mounted read-only into this site's executor only",
        f"SITE_DATA={data_dir}",
    ]
    m = re.fullmatch(r"hospital-(\d+)", site)
    if m:
        lines += [
            "# the same folder under the one-host trial's name (docker/compose.yml)",
            f"SITE{m[1]}_DATA={data_dir}",
        ]
    return "\n".join(lines) + "\n"


def kit_readme(site: str, install: str, address: str, cmd_here: str, node: NodeConfig, meta: dict) -> str:
    """The kit's README: what each file is, how to install, start and audit the site."""
    key = f"{install}/node.key"
    return f"""# DSFedMed site kit: {site}

Made by `dsfedmed provision` on {meta["created"]} for the federation whose SuperLink is
`{address}`. Install it at `{install}` at the site (the paths in `node-config.toml` point
there; edit them if you put it elsewhere).

| file | what | private? |
|---|---|---|
| `ca.pem` | the federation's CA certificate: the SuperNode verifies the SuperLink with it | public |
| `node.key` | this site's private key: the SuperNode signs its requests with it | **yes: never copy it off this site; mode 0600** |
| `node.pub` | its public key, registered with the SuperLink by the coordinating site | public |
| `node-config.toml` | the SuperNode's node config (data folder, site name, model, state, audit log, policy) | site-internal |
| `start-supernode.sh` | the exact `flower-supernode` command line and the site's task launcher (`dsfedmed site exec`) | site-internal |
| `allowed-fabs.txt` | the app bundles this site runs (empty: allow the reviewed bundle first) | site-internal |
| `site.env` | the same settings as docker compose variables | site-internal |
| `policy.toml` | what this site agrees to do and send; permissive defaults, tighten as needed | site-internal |
| `kit.json` | fingerprints (CA {meta["ca"]["sha256"][:23]}..., site key {meta["site_key"]["ssh_fingerprint"]}), CA expiry ({meta["ca"]["not_after"][:10]}) | public |

Your images and masks (`{node.data_dir or "set data-dir in node-config.toml"}`) stay here: what
leaves the site is what the protocol sends (model outputs on synthetic images or model weights,
metrics, and with pool-source 'generator' the generator's weights; docs/security.md), within
`policy.toml`. The state folder `{node.state_dir}` holds the site's model and its audit log
`{node.audit_log}`.

## 1. Check the site

```bash
dsfedmed preflight site --kit {install}
# the same, file by file:
dsfedmed preflight site --node-config-file {install}/node-config.toml --root-certificates {install}/ca.pem \\
  --auth-key {key} --superlink {address}
```

It checks the data folder (every file, class balance, sizes), that the model builds, the device,
package versions, free disk, the CA certificate's validity, the key and its permissions, and that
the SuperLink answers and its certificate verifies. Exit code 0: ready; 1: fix the `fail` rows first.

## 2. Allow the app bundle you reviewed

The site runs only app bundles on `allowed-fabs.txt`; any other is refused before any of its code
is installed. After reviewing the bundle the coordinator will run (`flwr build` makes the `.fab`):

```bash
dsfedmed site allow dsfedmed.fab --allow-list {install}/allowed-fabs.txt --note "reviewed <date>"
```

## 3. Start the SuperNode and the site's launcher

```bash
sh {install}/start-supernode.sh
```

which runs (nothing listens on the network: the SuperNode only connects out to `{address}`):

```
{cmd_here}
```

## 4. Audit what the site sent

Every reply the site sends is logged, one JSON line each, in `{node.audit_log}`:

```bash
dsfedmed audit {node.audit_log}{f" --data-dir {node.data_dir}" if node.data_dir else ""}
```

summarises it (replies, bytes and refusals per run, round and message type) and, with
`--data-dir`, checks that no array that left equals or is shaped like one of the site's images.
"""
