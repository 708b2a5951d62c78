"""Heatmaps of one attention site: exact block attention mass beside the blocks the method selects.

matplotlib is an optional extra (``pip install omnicompile[plot]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import OmniSparseConfig
from ..method import AttentionInputs, plan
from ..metrics import exact_block_mass
from ..recording import SiteRun


def plot_selection(run: SiteRun, config: OmniSparseConfig, heads: Sequence[int], path: str | Path) -> Path:
    """Draw, for batch 0 and each head in ``heads``, the exact block mass (log scale, top row) and the
    selected blocks (bottom row, lazy query blocks shaded) of a recorded run; write a PNG to ``path``.

    ``run`` must hold its inputs (record it with ``recording(keep_run=...)``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'omnicompile[plot]'") from exc
    if run.inputs is None:
        raise ValueError(f"site {run.site}: the run kept no inputs (record it with recording(keep_run=...))")
    q, k, attn_mask, is_causal, scale, softcap = run.inputs
    bad = [h for h in heads if not 0 <= h < q.shape[1]]
    if bad:
        raise ValueError(f"heads {bad} out of range: the site has {q.shape[1]} query heads")
    with torch.no_grad():
        selection = plan(AttentionInputs(q, k, None, attn_mask, is_causal, scale, softcap=softcap), config)
        mass = exact_block_mass(q, k, attn_mask, is_causal, scale, config.block_size, softcap=softcap)
    selected = selection.dense_mask()[0].float().cpu()
    lazy = selection.lazy[0].cpu()
    mass = mass[0].clamp_min(1e-6).log10().cpu()

    fig, axes = plt.subplots(2, len(heads), figsize=(4 * len(heads), 8), squeeze=False)
    for col, head in enumerate(heads):
        top, bottom = axes[0, col], axes[1, col]
        image = top.imshow(mass[head], cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
        top.set_title(f"head {head}: exact block mass (log10)")
        shown = selected[head].clone()
        shown[lazy[head]] *= 0.5
        bottom.imshow(shown, cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        bottom.set_title(f"head {head}: selected, {int(selected[head].sum())} blocks (lazy rows lighter)")
        for ax in (top, bottom):
            ax.set_xlabel("key block")
            ax.set_ylabel("query block")
    fig.suptitle(f"site {run.site}: q {tuple(q.shape)}, tau {config.tau}, estimator {config.estimator}")
    fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
