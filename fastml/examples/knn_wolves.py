"""k-nearest neighbours on the course's wolf-pack map: which group does the paw print belong to?

This reproduces the course's example (shared/seeds/004_*.txt, section 4.1.3, "KNN 的 PyTorch
实现") with its own data: nine points of two classes on the map, class 0 (the green circles, six
points) and class 1 (three points), and the paw print at (2, 2) to classify with k = 1, 3 and 5.
The course prints class 0 for every k:

    k=1: 预测类别 → 0
    k=3: 预测类别 → 0
    k=5: 预测类别 → 0

At k = 1 the answer rests on a tie: (2.0, 1.5) of class 0 and (2.5, 2.0) of class 1 are both
exactly 0.5 from the paw print. The course's torch.topk returned the lower index, and fastml
breaks ties the same way, by the lower index, so it prints the course's 0. The picture shows each
k's decision regions and the paw print.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastml
from fastml.training import figure, save_figure

# The course's data, as it gives them: (x, y) of each point and its class.
POINTS = torch.tensor([[1.0, 2.0], [1.5, 1.8], [2.0, 1.5],
                       [2.5, 2.0], [3.0, 1.8], [3.5, 1.5],
                       [2.0, 2.8], [1.8, 3.0], [2.2, 3.2]])
CLASSES = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0])
PAW_PRINT = torch.tensor([[2.0, 2.0]])  # the course's test point (中心爪印)
KS = (1, 3, 5)
COURSE_ANSWERS = {1: 0, 3: 0, 5: 0}  # what the course prints for each k


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    steps = 60 if quick else 240
    xs, ys = torch.linspace(0.5, 4.0, steps), torch.linspace(1.0, 3.7, steps)
    east, north = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([east.flatten(), north.flatten()], dim=1)

    fig = figure(figsize=(11, 4))
    predictions = {}
    for ax, k in zip(fig.subplots(1, len(KS)), KS):
        knn = fastml.neighbors.KNeighborsClassifier(n_neighbors=k).fit(POINTS, CLASSES)
        predictions[k] = int(knn.predict(PAW_PRINT)[0])
        region = knn.predict(grid).reshape(steps, steps)
        ax.contourf(east, north, region, levels=[-0.5, 0.5, 1.5], colors=["#d5efd5", "#fbe3c7"])
        for label, (marker, color) in enumerate((("o", "tab:green"), ("s", "tab:orange"))):
            ax.scatter(*POINTS[CLASSES == label].T, marker=marker, color=color, edgecolor="black",
                       label=f"class {label}", zorder=3)
        ax.scatter(*PAW_PRINT.T, marker="*", s=200, color="red", edgecolor="black", label="paw print", zorder=3)
        ax.set(title=f"k = {k}: class {predictions[k]}", xlabel="x", ylabel="y", aspect="equal")
    ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("The course's wolf-pack KNN: decision regions and the paw print at (2, 2)")
    png = save_figure(fig, Path(out_dir) / "knn_wolves.png")
    agrees = predictions == COURSE_ANSWERS
    answers = ", ".join(f"k={k}: {predictions[k]}" for k in KS)
    return {"predictions": predictions, "course_answers": dict(COURSE_ANSWERS), "matches_course": agrees,
            "files": [png],
            "headline": f"paw print at (2, 2): class {answers} "
                        f"({'the course prints the same' if agrees else 'the course prints 0 for every k'})"}
