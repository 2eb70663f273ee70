"""k-nearest neighbours on a wolf-pack map: which pack does a newly sighted wolf belong to?

The points are ILLUSTRATIVE, made up for this example; they are not the course's data (its
original nine wolves could not be found). Nine sightings of two packs on a map, one river-pack
wolf straying among the forest pack. With k = 1 every sighting claims the land nearest to it,
the stray wolf included; with k = 3 and k = 5 the majority of the neighbourhood decides, and the
stray's island disappears. The picture shows each k's decision regions.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastml
from fastml.training import figure, save_figure

PACKS = ("forest pack", "river pack")
# (km east, km north) of each sighting and its pack; the last wolf is the stray.
SIGHTINGS = torch.tensor([[1.0, 4.0], [1.5, 5.0], [2.5, 4.5], [2.0, 3.2],
                          [4.0, 1.0], [5.0, 2.0], [4.5, 3.0], [3.5, 1.8], [2.0, 4.3]])
PACK_OF = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
NEW_WOLVES = torch.tensor([[1.8, 4.0], [3.0, 3.0], [4.0, 4.5]])
KS = (1, 3, 5)


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    steps = 60 if quick else 240
    axis = torch.linspace(0, 6, steps)
    east, north = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([east.flatten(), north.flatten()], dim=1)

    fig = figure(figsize=(11, 4))
    predictions, training_accuracy = {}, {}
    for ax, k in zip(fig.subplots(1, len(KS)), KS):
        knn = fastml.neighbors.KNeighborsClassifier(n_neighbors=k).fit(SIGHTINGS, PACK_OF)
        predictions[k] = [PACKS[i] for i in knn.predict(NEW_WOLVES).tolist()]
        training_accuracy[k] = knn.score(SIGHTINGS, PACK_OF)
        region = knn.predict(grid).reshape(steps, steps)
        ax.contourf(east, north, region, levels=[-0.5, 0.5, 1.5], colors=["#d5efd5", "#d3e4f5"])
        for pack, (marker, color) in enumerate((("^", "tab:green"), ("o", "tab:blue"))):
            ax.scatter(*SIGHTINGS[PACK_OF == pack].T, marker=marker, color=color, edgecolor="black",
                       label=PACKS[pack], zorder=3)
        ax.scatter(*NEW_WOLVES.T, marker="*", s=160, color="gold", edgecolor="black", label="new sighting", zorder=3)
        for (x, y), pack in zip(NEW_WOLVES.tolist(), predictions[k]):
            ax.annotate(pack.split()[0], (x, y), xytext=(8, -12), textcoords="offset points", fontsize=8)
        ax.set(title=f"k = {k}", xlabel="km east", ylabel="km north", aspect="equal")
    ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Wolf-pack KNN: decision regions (illustrative points, not the course's data)")
    png = save_figure(fig, Path(out_dir) / "knn_wolves.png")
    where = ", ".join(f"({x:.1f}, {y:.1f})" for x, y in NEW_WOLVES.tolist())
    packs = "; ".join(f"k={k}: {', '.join(p.split()[0] for p in predictions[k])}" for k in KS)
    return {"predictions": predictions, "training_accuracy": training_accuracy, "files": [png],
            "headline": f"new wolves at {where} join the packs {packs}"}
