"""Can the GAN head tell real toy latents from generated ones, and from which features?

DMD2's discriminator reads the fake score's hidden tokens after one block, pools them and
classifies real against generated, both noised to a GAN timestep. This script measures, for the
toy problem, whether that is possible at all and with which choices, by training probes on frozen
features (so the answer does not depend on a training run):

- real: exact samples of the toy distribution; generated: a generator's 3-step samples (the
  teacher's weights by default, i.e. the generator at iteration 0), both for the same labels;
- each pair noised to each ``--sigmas`` level with the same noise for both sides;
- features: the fake score's (default: the teacher's weights, its state at iteration 0) tokens
  after every block, pooled by ``mean`` over tokens, or by ``meanstd`` (mean and standard
  deviation over tokens, concatenated);
- probe: logistic regression on standardized pooled features (L-BFGS, a small L2 penalty),
  trained on half the pairs and scored on the other half: held-out accuracy (0.5 = chance).

A probe near chance at every block and noise level means no head on those features can learn the
difference; where it separates, the trainer's head can, given a learning rate that lets it.

    python tools/gan_probe.py                                   # iteration-0 generator
    python tools/gan_probe.py --generator /tmp/student          # a distilled one (megadmd convert)
"""
from __future__ import annotations

import argparse

import torch

from megadmd import flow
from megadmd.models import load_wan, predict_velocity
from megadmd.toy.builtin import TOY_SPEC, builtin_teacher_dir
from megadmd.toy.distribution import sample as true_samples
from megadmd.toy.quality import conditions, eval_inputs, sample

POOLINGS = ("mean", "meanstd")


@torch.no_grad()
def block_tokens(model, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
    """The tokens ``[B, S, D]`` after every block of ``model`` for one forward."""
    out: list = []
    handles = [b.register_forward_hook(lambda _m, _i, o: out.append(o.float())) for b in model.blocks]
    try:
        predict_velocity(model, x_t, t, text, torch.float32)
    finally:
        for h in handles:
            h.remove()
    return out


def pool(tokens: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return tokens.mean(dim=1)
    return torch.cat([tokens.mean(dim=1), tokens.std(dim=1)], dim=1)


def probe_accuracy(feat: torch.Tensor, label: torch.Tensor, train: torch.Tensor, l2: float = 1e-3) -> float:
    """Held-out accuracy of a logistic regression trained on the rows ``train`` (bool mask)."""
    mu, sd = feat[train].mean(0), feat[train].std(0) + 1e-6
    z = (feat - mu) / sd
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    y = label.float()

    def closure():
        opt.zero_grad()
        logits = z[train] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[train]) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (z[~train] @ w + b) > 0
    return float((pred == label[~train].bool()).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default=None, help="generator folder (default: the toy teacher's weights)")
    ap.add_argument("--fake-score", default=None, help="features from this model (default: the toy teacher)")
    ap.add_argument("--teacher", default=None, help="toy teacher (default: the shipped one)")
    ap.add_argument("--per-class", type=int, default=128)
    ap.add_argument("--sigmas", default="0.02,0.1,0.25,0.5,0.75,0.9")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher_dir = args.teacher or str(builtin_teacher_dir())
    generator = load_wan(args.generator or teacher_dir).eval()
    fake_score = load_wan(args.fake_score or teacher_dir).eval()
    labels, noise, renoise = eval_inputs(TOY_SPEC, args.per_class, args.seed, torch.device("cpu"))
    fake = sample(generator, "student", TOY_SPEC, labels, noise, renoise)
    real, _ = true_samples(TOY_SPEC, labels, torch.Generator().manual_seed(args.seed + 1))
    text, _ = conditions(TOY_SPEC, labels, torch.device("cpu"))
    g = torch.Generator().manual_seed(args.seed + 2)
    n = labels.shape[0]
    train = torch.zeros(2 * n, dtype=torch.bool)
    train[torch.randperm(2 * n, generator=g)[:n]] = True
    target = torch.cat([torch.ones(n), torch.zeros(n)])
    print(f"real vs generated, {args.per_class} per class and side; held-out accuracy of a linear probe")
    print(f"{'sigma':>6} {'block':>5} " + " ".join(f"{p:>8}" for p in POOLINGS))
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        eps = torch.randn(real.shape, generator=g)
        x = flow.add_noise(torch.cat([real, fake]), torch.cat([eps, eps]), torch.tensor(sigma))
        t = torch.full((2 * n,), sigma * flow.NUM_TRAIN_TIMESTEPS)
        feats = block_tokens(fake_score, x, t, torch.cat([text, text]))
        for k, tokens in enumerate(feats):
            accs = [probe_accuracy(pool(tokens, p), target, train) for p in POOLINGS]
            print(f"{sigma:6.2f} {k:5d} " + " ".join(f"{a:8.3f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()
