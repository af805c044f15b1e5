"""Train a base classifier under noise, or a noise parameter generator (NPG).

``ucan train classifier ...`` / ``ucan train npg ...``: the options of
:class:`~ucan_smoothing.training.config.TrainConfig` on the command line; the
work is :func:`ucan_smoothing.training.train` (docs in its module).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..core.noises import FAMILIES
from ..npg.generators import GENERATORS
from ..npg.shifts import SHIFTS
from ..training import train
from ..training.checkpoints import read_run_record
from ..training.config import OPTIMIZERS, TARGETS


def _centre(text: str):
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("--centre takes ROW,COLUMN")
    return [float(p) for p in parts]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``ucan train``. Unset options take the model's / target's defaults (listed in the help)."""
    parser.epilog = (
        "examples:\n"
        "  ucan train classifier --model mnist_cnn --noise gaussian --scale 0.25 --out runs/mnist-g025\n"
        "  ucan train npg --kind universal --base runs/mnist-g025/final.pt --out runs/mnist-g025-universal\n"
        "  ucan train npg --kind pattern --p inf --kappa 0.01 --iota 1 --joint --base runs/mnist-g025/final.pt\n"
        "  ucan train npg --kind noisy_shift --base runs/mnist-g025 --out runs/mnist-g025-noisy-shift\n"
        "  ucan train npg --kind lipschitz_shift --lipschitz 0.5 --base runs/mnist-g025 --out runs/mnist-g025-lip\n"
        "  ucan train --resume --out runs/mnist-g025          (continue an interrupted run; exit 0 if finished)\n"
        "  torchrun --nproc_per_node=2 -m -- ucan_smoothing.cli train classifier ...   (DDP; the -- keeps\n"
        "      torchrun from reading our options as its own)\n")
    parser.add_argument("target", nargs="?", choices=TARGETS,
                        help="classifier: noise-augmented training; npg: train a noise parameter generator")
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", help="model name (mnist_cnn, resnet20, resnet110, resnet50); default: for `npg`, the "
                   "--base classifier's, else mnist_cnn")
    g.add_argument("--dataset", help="data set; default: for `npg`, the --base classifier's, else the model's")
    g.add_argument("--data-root", help="data folder (MNIST/Fashion-MNIST have defaults; CIFAR-10/ImageNet need one)")
    g.add_argument("--max-train", type=int, help="train on the first N training images only")
    g.add_argument("--max-test", type=int, help="evaluate on the first N test images only")
    g = parser.add_argument_group("noise")
    g.add_argument("--noise", help=f"isotropic family: {', '.join(FAMILIES)} (default gaussian)")
    g.add_argument("--scale", type=float, help="noise level lambda (default 0.25)")
    g.add_argument("--power-a", type=float, help="exponent a of the power-law family (a > input dimension)")
    g = parser.add_argument_group("noise parameter generator")
    g.add_argument("--kind", choices=sorted(GENERATORS) + sorted(SHIFTS),
                   help="NPG kind (npg target); with `classifier`, only pattern (a fixed noise shape). The sound "
                        "input-adaptive modes: noisy_shift (f(z + mu(z)) on the noisy sample z) and lipschitz_shift "
                        "(f(x + mu(x) + noise), mu L-Lipschitz, radius R / (1 + L)); docs/adaptive.md")
    g.add_argument("--npg-checkpoint", help="classifier target, or a shift kind: shape the (fixed) noise by the NPG "
                   "of this checkpoint (pattern or universal)")
    g.add_argument("--p", choices=["1", "2", "inf"], help="pattern: norm of the distance (default 2)")
    g.add_argument("--kappa", type=float, help="pattern: kappa >= 0 (default 0.01, pixel units)")
    g.add_argument("--iota", type=float, help="pattern: iota > 0 (default 1)")
    g.add_argument("--centre", type=_centre, help="pattern: centre ROW,COLUMN in pixels (default: image centre)")
    g.add_argument("--train-pattern", action="store_true", default=None,
                   help="pattern: learn kappa and iota (default: hand-set, as in the paper)")
    g.add_argument("--gamma", type=float, help="universal / input-dependent: bound of log sigma "
                   "(default 5; 2 on ImageNet; 1 for input-dependent); shift kinds: bound of |mu| (default 1); "
                   "elastic_sigma: bound of |log sigma| (default 0.5)")
    g.add_argument("--gamma-mu", type=float, help="universal: bound of |mu| (default gamma)")
    g.add_argument("--normalize", choices=["none", "geometric"],
                   help="divide sigma by its geometric mean (default: geometric for pattern, none otherwise)")
    g.add_argument("--no-mu", action="store_true", default=None, help="universal: keep mu = 0")
    g.add_argument("--hidden", type=int, help="universal, lipschitz_shift: width of the MLP layers (default 256); elastic_sigma: (default 64)")
    g.add_argument("--lipschitz", type=float, help="lipschitz_shift: the Lipschitz bound L enforced on mu "
                   "(default 0.5; certified radius R / (1 + L), L recomputed from the weights)")
    g.add_argument("--depth", type=int, help="lipschitz_shift: number of linear layers of mu (default 2); "
                   "elastic_sigma: of the level's MLP (default 2)")
    g.add_argument("--elasticity", type=float, help="elastic_sigma: the bound r enforced on the l2 Lipschitz constant "
                   "of log sigma(x) (default 0.01; recomputed from the weights for the certificate)")
    g.add_argument("--latent-dim", type=int, help="universal: size of the fixed input vector (default 64)")
    g.add_argument("--base", help="npg target: checkpoint (or run folder) of the base classifier")
    g.add_argument("--joint", action="store_true", default=None, help="npg target: train the classifier too")
    g.add_argument("--sigma-weight", type=float, help="w in the loss -w * mean(sigma) + CE (default 0.01; "
                   "on MNIST 0.1 already costs ~18 points of accuracy under noise, 1 collapses to chance)")
    g = parser.add_argument_group("optimisation (defaults: Adam 1e-3 for mnist_cnn and NPGs; SGD 0.1, "
                                  "momentum 0.9, weight decay 1e-4, lr x0.1 every 30 of 90 epochs for ResNets)")
    g.add_argument("--epochs", type=int, help="number of epochs (default 10 mnist_cnn, 90 ResNets, 5 NPGs)")
    g.add_argument("--batch-size", type=int, help="global batch size (default 128; 256 for ResNets)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default: adam for mnist_cnn and NPGs, sgd for ResNets)")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="weight decay (default 0; 1e-4 for ResNets)")
    g.add_argument("--lr-step", type=int, help="epochs between learning-rate decays (0: constant)")
    g.add_argument("--lr-decay", type=float, help="learning-rate factor at each step (default 0.1)")
    g.add_argument("--classifier-lr", type=float, help="npg target with --joint: the classifier's learning rate")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--threads", type=int, help="CPU threads per process (default: torch's, which follows OMP_NUM_THREADS)")
    g.add_argument("--workers", type=int, help="DataLoader workers for on-disk image folders (default 0)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also save last.pt every STEPS training steps inside an epoch, so an interruption "
                        "loses at most STEPS steps (default 0: at epoch ends only)")
    g.add_argument("--out", help="run folder (default runs/<target>-<model>-<noise><scale>-<time>)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its last checkpoint (same options; --epochs may grow)")
    g.add_argument("--no-progress", action="store_true", default=None, help="no progress bars or epoch lines")
    parser.set_defaults(_train_parser=parser)


_NPG_FLAGS = {"p": "p", "kappa": "kappa", "iota": "iota", "centre": "centre", "train_pattern": "trainable",
              "gamma": "gamma", "gamma_mu": "gamma_mu", "normalize": "normalize", "hidden": "hidden",
              "latent_dim": "latent_dim", "lipschitz": "lipschitz", "depth": "depth",
              "elasticity": "elasticity"}
_PLAIN_FLAGS = ("model", "dataset", "data_root", "max_train", "max_test", "noise", "scale", "npg_checkpoint", "base",
                "joint", "sigma_weight", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "lr_step", "lr_decay", "classifier_lr", "seed", "device", "threads", "workers", "checkpoint_every",
                "out", "resume")


def config_from_args(args: argparse.Namespace) -> dict:
    """The options given on the command line as a partial config (unset options left out).

    With ``--resume`` the saved config of the run folder fills in every option
    not given, so ``ucan train --resume --out RUN`` is enough.
    """
    given = {name: getattr(args, name) for name in _PLAIN_FLAGS if getattr(args, name, None) is not None}
    if args.target is not None:
        given["target"] = args.target
    if args.no_progress:
        given["progress"] = False
    if args.power_a is not None:
        given["noise_params"] = {"a": args.power_a}
    npg_given = {}
    for flag, key in _NPG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            npg_given[key] = (value if flag != "p" else (value if value == "inf" else int(value)))
    if args.no_mu:
        npg_given["learn_mu"] = False
    if args.kind is not None:
        given["npg"] = {"kind": args.kind, **npg_given}
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out RUN_FOLDER")
        path = Path(args.out) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {str(path)!r} does not exist")
        saved = read_run_record(args.out)["config"]
        if "npg" in given and saved.get("npg") is not None:
            given["npg"] = {**saved["npg"], **given["npg"]}
        elif npg_given and saved.get("npg") is not None:
            given["npg"] = {**saved["npg"], **npg_given}
        elif npg_given:
            raise ValueError("generator options were given but the run has no NPG")
        return {**saved, **given}
    if npg_given and args.kind is None:
        raise ValueError(f"generator options ({', '.join('--' + k.replace('_', '-') for k in npg_given)}) "
                         "need --kind")
    if "target" not in given:
        raise ValueError("say what to train: `ucan train classifier ...` or `ucan train npg ...`")
    return given


def command_line(args: argparse.Namespace) -> str:
    """The ``ucan train ...`` command equivalent to the parsed ``args`` (the options given, in order)."""
    parser = getattr(args, "_train_parser", None)
    words = ["ucan", "train"]
    if parser is None:
        return shlex.join(words + sys.argv[1:])
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "_train_parser") or value is None or value is False:
            continue
        if not action.option_strings:
            words.append(str(value))
        elif action.nargs == 0:
            words.append(action.option_strings[0])
        else:
            text = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
            words += [action.option_strings[0], text]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    values = config_from_args(args)
    out = train(values, command=command_line(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {out}")
    return 0
