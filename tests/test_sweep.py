"""Spec parsing, the grid, stable ids and clear errors (pure Python: no torch, no ray)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import SpecError, load_spec, parse_spec, preset_names

BASE = """
[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [1, 2]
filters = 8
kernel = 3
"""


def test_paper_preset_size():
    spec = load_spec("paper")
    cells = spec.cells()
    assert len(cells) == 6912
    assert len({c.cell_id for c in cells}) == 6912
    groups = {}
    for c in cells:
        groups.setdefault(c.pair_key, []).append(c["architecture"])
    assert len(groups) == 3456
    assert all(sorted(a) == ["parallel", "sequential"] for a in groups.values())


def test_presets_ship_and_parse():
    assert {"demo", "paper"} <= set(preset_names())
    for name in preset_names():
        assert load_spec(name).cells()


def test_ids_independent_of_key_order_list_order_and_float_spelling():
    a = parse_spec(BASE + "lr = [3e-3, 1e-3]\n")
    b = parse_spec("""
[grid]
lr = [0.001, 0.003]
kernel = 3
filters = 8
layers = [2, 1]
architecture = ["parallel", "sequential"]
dataset = "digits"
""")
    assert {c.cell_id for c in a.cells()} == {c.cell_id for c in b.cells()}
    assert {c.pair_key for c in a.cells()} == {c.pair_key for c in b.cells()}


def test_pair_key_joins_twins_and_ids_differ():
    cells = parse_spec(BASE).cells()
    assert len(cells) == 4
    by_pair = {}
    for c in cells:
        by_pair.setdefault(c.pair_key, set()).add(c["architecture"])
    assert list(by_pair.values()) == [{"sequential", "parallel"}] * 2
    # Twins run next to each other (interleaved), so partial studies hold whole pairs.
    assert cells[0].pair_key == cells[1].pair_key


@pytest.mark.parametrize("extra, needle", [
    ("colour = 3\n", "unknown key 'grid.colour'"),
    ("lr = 'fast'\n", "'grid.lr' must be float"),
    ("epochs = []\n", "'grid.epochs' is an empty list"),
    ("batch_norm = 1\n", "'grid.batch_norm' must be bool"),
])
def test_spec_errors_name_the_key(extra, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(BASE + extra)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_dataset_and_architecture_list_allowed_values():
    with pytest.raises(SpecError, match="allowed values: digits, mnist, fashion_mnist, cifar10"):
        parse_spec(BASE.replace('"digits"', '"imagenet"'))
    with pytest.raises(SpecError, match="allowed values: sequential, parallel"):
        parse_spec(BASE.replace('"parallel"]', '"transformer"]'))


def test_unknown_top_level_table_and_missing_required():
    with pytest.raises(SpecError, match="unknown key 'grdi'"):
        parse_spec("[grdi]\nlayers = 1\n")
    with pytest.raises(SpecError, match="lacks 'kernel'"):
        parse_spec(BASE.replace("kernel = 3\n", ""))


def test_exclude_drops_matching_cells():
    spec = parse_spec(BASE + "[[exclude]]\nlayers = 1\narchitecture = 'parallel'\n")
    archs = sorted((c["layers"], c["architecture"]) for c in spec.cells())
    assert archs == [(1, "sequential"), (2, "parallel"), (2, "sequential")]
    with pytest.raises(SpecError, match="unknown key 'exclude.depth'"):
        parse_spec(BASE + "[[exclude]]\ndepth = 1\n")


def test_architecture_specific_axes_do_not_multiply_other_architectures():
    spec = parse_spec(BASE.replace('["sequential", "parallel"]', '["sequential", "highway"]')
                      + "[grid.highway]\ngate = ['full', 'coupled', 'c_only', 't_only']\n")
    cells = spec.cells()
    seq = [c for c in cells if c["architecture"] == "sequential"]
    hw = [c for c in cells if c["architecture"] == "highway"]
    assert len(seq) == 2 and len(hw) == 8
    assert all("gate" not in c.config for c in seq)
    # Every highway variant pairs with the sequential cell at the same settings.
    assert {c.pair_key for c in hw} == {c.pair_key for c in seq}
    # A top-level value of an architecture-specific key applies only where it is used.
    spec2 = parse_spec(BASE.replace('["sequential", "parallel"]', '["sequential", "merge_and_run"]')
                       + "branches = [2, 3]\n")
    assert len(spec2.cells()) == 2 + 4
    with pytest.raises(SpecError, match="does not apply to highway"):
        parse_spec(BASE.replace('"parallel"]', '"highway"]') + "[grid.highway]\nbranches = 2\n")


def test_extension_rules():
    old = parse_spec(BASE)
    parse_spec(BASE.replace("layers = [1, 2]", "layers = [1, 2, 3]")).check_extends(old)
    parse_spec(BASE + "seed = [0, 1]\n").check_extends(old)  # fixed value -> axis holding it
    with pytest.raises(SpecError, match="spec changes 'filters'.*16"):
        parse_spec(BASE.replace("filters = 8", "filters = 16")).check_extends(old)
    with pytest.raises(SpecError, match="spec changes 'epochs'"):
        parse_spec(BASE + "epochs = 3\n").check_extends(old)


def test_unknown_preset_message():
    with pytest.raises(SpecError, match="no spec file or preset named 'nope'; presets: .*demo"):
        load_spec("nope")


def test_sweep_imports_neither_torch_nor_ray():
    code = ("import sys, sweep; sweep.load_spec('paper').cells(); "
            "import study.schema, study.store; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_driver_imports_neither_torch_nor_the_figures(tmp_path):
    # The CLI imported analysis (matplotlib, scipy: ~1.7 s of every `study run`'s start-up)
    # only to catch its error type; the driver's modules never need torch. Both now load
    # only where they are used.
    code = ("import sys; from study import cli, executors, runner; "
            "assert cli.main(['resume', sys.argv[1]]) == 3; "
            "print(sorted(m for m in ('torch', 'analysis', 'matplotlib', 'scipy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere in it (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_imports_flow_one_way_study_never_imports_analysis_but_its_cli():
    study = Path(__file__).resolve().parent.parent / "study"
    modules = sorted(study.rglob("*.py"))
    assert study / "cli.py" in modules and study / "lesion.py" in modules
    assert "analysis" in _imported_packages(study / "cli.py")  # the check sees lazy imports
    bad = [str(p.relative_to(study)) for p in modules
           if p.name != "cli.py" and "analysis" in _imported_packages(p)]
    assert bad == [], f"study modules importing analysis (only study/cli.py may): {bad}"
    sweep = study.parent / "sweep"
    bad = [str(p) for p in sweep.rglob("*.py") if _imported_packages(p) & {"study", "analysis"}]
    assert bad == [], f"sweep modules importing study or analysis: {bad}"


def test_active_inputs_cannot_exceed_branches():
    with pytest.raises(SpecError, match="active_inputs = 5 exceeds branches = 4"):
        parse_spec(BASE.replace('"parallel"]', '"learned_connectivity"]')
                   + "[grid.learned_connectivity]\nbranches = 4\nactive_inputs = 5\n").cells()


# -- stem and head parameters ------------------------------------------------------------------
def test_head_and_pool_defaults_and_errors_name_the_allowed_values():
    c = parse_spec(BASE).cells()[0]
    assert c["head"] == "flatten" and c["pool"] == 2
    with pytest.raises(SpecError, match="'grid.head' = 'avg' is not allowed; allowed values: flatten, gap"):
        parse_spec(BASE + "head = 'avg'\n")
    with pytest.raises(SpecError, match="'grid.pool' = 3 is not allowed; allowed values: 1, 2, 4"):
        parse_spec(BASE + "pool = [2, 3]\n")
    with pytest.raises(SpecError, match="'grid.pool' must be int"):
        parse_spec(BASE + "pool = 'max'\n")


def test_head_and_pool_enter_cell_id_and_pair_key():
    base = parse_spec(BASE).cells()
    for extra in ("head = 'gap'\n", "pool = 4\n"):
        other = parse_spec(BASE + extra).cells()
        assert not {c.cell_id for c in base} & {c.cell_id for c in other}
        assert not {c.pair_key for c in base} & {c.pair_key for c in other}
    # Swept, they multiply the cells; twins still pair within each (head, pool).
    cells = parse_spec(BASE + "head = ['flatten', 'gap']\npool = [1, 2, 4]\n").cells()
    assert len(cells) == 4 * 6 and len({c.pair_key for c in cells}) == 2 * 6
    # The default spelled out is the same cell.
    spelled = parse_spec(BASE + "head = 'flatten'\npool = 2\n").cells()
    assert [c.cell_id for c in spelled] == [c.cell_id for c in base]


def test_paper_preset_fixes_head_and_sweeps_pool():
    spec = load_spec("paper")
    assert spec.grid["head"] == ["flatten"] and spec.grid["pool"] == [1, 2, 4]
    layers_1 = {c.pair_key for c in spec.cells() if c["layers"] == 1}
    assert len(layers_1) == 576  # the header's count of one-network "pairs"


# -- Q coverage in `study plan` ------------------------------------------------------------------
# Hand-computed (sequential = parallel; filters 4, kernel 3, 1,000 training examples, 10 classes):
#   stem  in*4*9 + 4          mnist (1 channel, 28x28) 40, cifar10 (3 channels, 32x32) 112
#   body  per layer 4*4*9 + 4 = 148
#   head  flatten: 4*(side/pool)^2*10 + 10, gap: 4*10 + 10 = 50
#   mnist:   pool 1 31,370 -> n 31,558 / 31,706, Q 0.32     [0,1)
#            pool 2  7,850 -> n  8,038 /  8,186, Q 1.24/1.22 [1,3)
#            pool 4  1,970 -> n  2,158 /  2,306, Q 4.6/4.3  [3,10)
#            gap        50 -> n    238 /    386, Q 42/26    [10,inf)  (x 3 pools)
#   cifar10: pool 1 40,970 -> n 41,230 / 41,378, Q 0.24     [0,1)
#            pool 2 10,250 -> n 10,510 / 10,658, Q 0.95     [0,1)
#            pool 4  2,570 -> n  2,830 /  2,978, Q 3.5/3.4  [3,10)
#            gap        50 -> n    310 /    458             [10,inf)  (x 3 pools)
COVERAGE_SPEC = """
[grid]
dataset = ["mnist", "cifar10"]
architecture = ["sequential", "parallel"]
layers = [1, 2]
filters = 4
kernel = 3
pool = [1, 2, 4]
head = ["flatten", "gap"]
max_train_examples = 1000
"""


def test_plan_prints_the_q_coverage_per_dataset(tmp_path):
    spec = tmp_path / "cov.toml"
    spec.write_text(COVERAGE_SPEC)
    out = subprocess.run([sys.executable, "-m", "study.cli", "plan", str(spec), "--results",
                          str(tmp_path / "res")], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    block = lines[lines.index(next(x for x in lines if x.startswith("Q coverage"))):]
    assert block[1].split() == (
        "mnist 24 cells, 1,000 train x 10 classes: [0,1) 4 (17%) [1,3) 4 (17%) "
        "[3,10) 4 (17%) [10,inf) 12 (50%); n_params 238-31,706").split()
    assert block[2].split() == (
        "cifar10 24 cells, 1,000 train x 10 classes: [0,1) 8 (33%) [1,3) 0 (0%) "
        "[3,10) 4 (17%) [10,inf) 12 (50%); n_params 310-41,378").split()


def test_coverage_counts_training_examples_from_known_sizes():
    from sweep.params import n_train_examples

    assert n_train_examples("mnist", 0.1, None) == 54_000
    assert n_train_examples("cifar10", 0.1, None) == 45_000
    assert n_train_examples("fashion_mnist", 0.2, 5000) == 5000
    assert n_train_examples("digits", 0.1, None) == 1294  # 1,797 - 359 test - 144 validation


# -- did you mean ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    (BASE + "learning_rate = 0.1\n", "unknown key 'grid.learning_rate' (did you mean 'lr'?)"),
    (BASE + "filter = 4\n", "(did you mean 'filters'?)"),
    (BASE.replace('"parallel"]', '"paralel"]'), "= 'paralel' is not allowed (did you mean 'parallel'?)"),
    (BASE + 'activation = "rlu"\n', "(did you mean 'relu'?)"),
    ("[studdy]\n" + BASE, "unknown key 'studdy' (did you mean 'study'?)"),
    (BASE.replace('architecture = ["sequential", "parallel"]',
                  'architecture = ["sequential", "highway"]') + "[grid.higway]\ngate = 'full'\n",
     "[grid.higway] is not an architecture (did you mean 'highway'?)"),
])
def test_misspellings_get_did_you_mean(text, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_misspelled_preset_and_far_off_names():
    with pytest.raises(SpecError, match=r"no spec file or preset named 'demoo' \(did you mean 'demo'\?\)"):
        load_spec("demoo")
    with pytest.raises(SpecError) as e:  # nothing close: no guess
        load_spec("zzzzzzzz")
    assert "did you mean" not in str(e.value)


# -- same-network copies --------------------------------------------------------------------------
def test_same_network_groups_in_the_presets():
    from sweep import same_network

    for name, n_cells, n_copies in (("demo", 72, 6), ("paper", 6912, 576)):
        cells = load_spec(name).cells()
        groups = same_network.groups(cells)
        extra = [c for g in groups.values() for c in g if c is not same_network.trained_cell(g)]
        assert (len(cells), len(extra)) == (n_cells, n_copies)
        # exactly the parallel cells at layers 1, each grouped with its sequential twin
        assert all(c["architecture"] == "parallel" and c["layers"] == 1 for c in extra)
        for g in groups.values():
            if len(g) > 1:
                assert len({c.pair_key for c in g}) == 1
                assert same_network.trained_cell(g)["architecture"] == "sequential"


def test_network_id_is_the_canonical_cell_id():
    from sweep import same_network

    spec = parse_spec(BASE.replace('["sequential", "parallel"]',
                                   '["sequential", "parallel", "highway", "merge_and_run"]')
                      + "[grid.highway]\ngate = ['residual', 'full']\n"
                      + "[grid.merge_and_run]\nbranches = [1, 2]\nmatch_params = [false, true]\n")
    cells = spec.cells()
    seq = {c["layers"]: c.cell_id for c in cells if c["architecture"] == "sequential"}
    for c in cells:
        nid = same_network.network_id(c.config)
        same = ((c["architecture"] == "parallel" and c["layers"] == 1)
                or c.config.get("gate") == "residual" or c.config.get("branches") == 1)
        assert nid == (seq[c["layers"]] if same else c.cell_id), c.config
        assert (same_network.why(c.config) is not None) == same
    # from a store row: pandas floats and NaN for another architecture's parameters
    c = next(c for c in cells if c.config.get("branches") == 1 and c["layers"] == 2)
    row = {**{k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
              for k, v in c.config.items()}, "gate": float("nan")}
    assert same_network.network_id(same_network.config_from_row(row)) == seq[2]
