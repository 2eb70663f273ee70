"""k-nearest neighbours on scikit-learn's 8×8 digits: each test digit takes the majority label of
its k closest training digits (euclidean distance over the 64 pixels). No training at all, and
about 98% right: the picture shows the test accuracy for each k and the digits it still gets
wrong.
"""

from __future__ import annotations

from pathlib import Path

import fastml
from fastml.examples._common import load_digits
from fastml.training import figure, save_figure

KS = (1, 3, 5, 7, 9, 11, 15)


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    X_train, y_train, X_test, y_test = load_digits()
    ks = KS[:3] if quick else KS
    accuracy, mistakes = {}, {}
    for k in ks:
        knn = fastml.neighbors.KNeighborsClassifier(n_neighbors=k).fit(X_train.flatten(1), y_train)
        predicted = knn.predict(X_test.flatten(1))
        accuracy[k] = float((predicted == y_test).float().mean())
        mistakes[k] = (predicted != y_test).nonzero().flatten(), predicted
    best = max(ks, key=lambda k: (accuracy[k], -k))

    fig = figure(figsize=(9, 3.6))
    curve, wrong = fig.subfigures(1, 2, width_ratios=[1, 1.3])
    ax = curve.subplots()
    ax.plot(list(accuracy), [100 * a for a in accuracy.values()], "o-")
    ax.set(title="test accuracy (%)", xlabel="k (neighbours that vote)", xticks=list(ks))
    wrong_rows, predicted = mistakes[best]
    shown = wrong_rows[:12].tolist()
    wrong.suptitle(f"k = {best}: {len(wrong_rows)} of {len(y_test)} test digits wrong", fontsize=10)
    for ax, row in zip(wrong.subplots(3, 4).flatten(), shown + [None] * (12 - len(shown))):
        ax.axis("off")
        if row is not None:
            ax.imshow(X_test[row].numpy(), cmap="gray_r")
            ax.set_title(f"{int(predicted[row])} (is {int(y_test[row])})", fontsize=8)
    png = save_figure(fig, Path(out_dir) / "knn_digits.png")
    return {"accuracy": accuracy, "best_k": best, "files": [png],
            "headline": f"test accuracy {accuracy[best]:.1%} at k = {best} "
                        f"({', '.join(f'k={k}: {a:.1%}' for k, a in accuracy.items())})"}
