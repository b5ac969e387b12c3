#!/usr/bin/env python3
"""Render expert-affinity.png from results.json: for every MoE layer, the
share of each domain's and each token type's top-2 assignments per expert."""
import json, os, sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    res = json.load(open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results.json")))
    aff = res["expert_affinity"]
    dom, typ = np.array(aff["by_domain"]), np.array(aff["by_token_type"])
    types = aff["token_types"]
    keep = [i for i, n in enumerate(aff["token_type_counts"]) if n > 0]
    typ = typ[:, keep, :]
    types = [types[i] for i in keep]
    L, _, E = dom.shape
    vmax = max(0.5, float(max(dom.max(), typ.max())))
    fig, axes = plt.subplots(2, L, figsize=(3.2 * L, 6.4), constrained_layout=True)
    axes = np.array(axes).reshape(2, L)
    for l in range(L):
        for row, (m, labels, title) in enumerate(((dom[l], aff["domains"], "by domain"), (typ[l], types, "by token type"))):
            ax = axes[row, l]
            im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(E))
            ax.set_xticklabels([str(e) for e in range(E)], fontsize=8)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels if l == 0 else [""] * len(labels), fontsize=8)
            ax.set_title(f"layer {l} {title}", fontsize=9)
            ax.set_xlabel("expert", fontsize=8)
            for i in range(m.shape[0]):
                for j in range(E):
                    ax.text(j, i, f"{m[i, j]*100:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < vmax * 0.6 else "black")
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of the group's top-2 assignments (uniform = 0.125)")
    fig.suptitle("demo-moe: expert affinity on the held-out slices (numbers are percent)", fontsize=11)
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "expert-affinity.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
