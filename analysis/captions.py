"""The figures an analysis draws, in the order they are drawn, saved and shown, each with the
caption the report gives it: the one list of figure stems (`only=` is checked against it)."""

# stem -> one-line caption: what each mark, bar and band is ({a}, {b}: the architectures,
# {n}: complete pairs that compare two different networks, {cells}: finished cells).
FIGURES = {
    "forest": "Equivalence of {b} and {a}: per dataset, loss and Q bin, the ratio {b}/{a} of the "
              "loss (exp of the settings' mean log ratio; n = settings), its t interval at the "
              "level the verdict used (thick: the Bonferroni interval of the row's Holm family, "
              "1 − 2α/m, its level beside n; headline rows are one family, each dataset and "
              "loss's Q bins another) with the unadjusted 90% interval's ends (ticks), the "
              "margin {margin} (green band), the seed noise (hatched: median ratio between two "
              "seeds of one network, where the study has repeats) and the verdict (two one-sided "
              "t-tests and a two-sided t-test, Holm-adjusted within the family; † where Holm "
              "decides and the drawn interval does not). Log-ratio axis.",
    "seed_noise": "Seed noise against the architecture effect, on one log-ratio axis: the loss "
                  "ratio (larger/smaller) between two seeds of one network of {a} and of {b}, "
                  "and between {a} and {b} at one setting and seed; boxes: quartiles and median, "
                  "whiskers: 5th to 95th percentile.",
    "train_time": "Training time per epoch (the training pass alone, median over a cell's "
                  "epochs), {b}/{a}: per dataset and Q bin the median over settings of the "
                  "ratio (seeds averaged) with its percentile-bootstrap 95% interval; dashed: "
                  "equal time. Times depend on the hardware and on how many cells shared it.",
    "equivalence_loss": "Final train and validation loss of {b} (y) against {a} (x), one dot per "
                        "setting (the geometric mean over its seeds; n = {n} settings), colour = "
                        "Q bin; dashed: y = x; panel titles: median ratio {b}/{a} and the "
                        "settings {b} wins. Log-log axes.",
    "table2": "Table 2 as a figure: mean train and validation loss per architecture (rows) and "
              "Q bin (columns); each cell gives the mean and n, the number of finished cells "
              "averaged; one log colour scale per dataset; grey '–': no cell in that bin.",
    "ratio_distribution": "Histogram of log10({b}/{a}) of the final loss over n = {n} settings "
                          "(seeds averaged); "
                          "red line: median, red band: its percentile-bootstrap 95% interval "
                          "(2,000 resamples); dashed: equal loss.",
    "factor_effects": "Median log10({b}/{a}) loss ratio at each value of each swept grid axis; "
                      "error bars: percentile-bootstrap 95% interval of that median over the "
                      "settings at that value (n = {n} settings in all); dashed: equal loss.",
    "learning_curves": "Learning curves of the pairs with the largest, smallest and median "
                       "validation-loss ratio: train (dashed) and validation (solid) loss per "
                       "epoch, {a} and {b} in their colours; log loss axis.",
    "equivalence_accuracy": "Final validation and test accuracy of {b} (y) against {a} (x), one "
                            "dot per setting (n = {n} settings), colour = Q bin; dashed: y = x. "
                            "Linear axes.",
    "zoo": "Final validation loss against parameter count of every finished cell (n = {cells}), "
           "colour = architecture (cells per architecture in the legend); log-log axes.",
    "lesions": "Lesions (drawn when `study lesion` has written lesions/lesions.parquet): rise of "
               "the validation loss when block i of a saved network is removed (left) or blocks "
               "i and i+1 are swapped (right), by block position, one row per depth in blocks; "
               "each point the mean over a variant's cells; symmetric log axis.",
}
