"""The package's imports run one way: no cycle, and each module imports only from its own layer or those below.

The imports are read from the source with `ast` (module level and inside functions), so the test sees what Python
would import without importing anything. The only imports allowed to point upwards are the hand-offs: methods named
in HAND_OFFS that import, when called, the module that does the work (as transformers' `from_pretrained` does).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "m2bert_hf_mlx"
# The folders pyproject.toml installs as sub-packages of m2bert_hf_mlx.
FOLDERS = {
    PACKAGE: ROOT / PACKAGE,
    f"{PACKAGE}.conversion": ROOT / "conversion",
    f"{PACKAGE}.metal": ROOT / "metal",
    f"{PACKAGE}.model_cards": ROOT / "model_cards",
}
HAND_OFFS = {"from_pretrained", "save_pretrained", "push_to_hub", "encode"}

# Bottom to top; a module may import modules of its own layer and of the layers below it.
LAYERS = [
    ("foundation", ["_package", "cpu_blas", "errors", "configuration_m2_bert", "metal", "model_cards"]),
    (
        "layers",
        [
            "activations",
            "modeling_outputs",
            "initialization",
            "losses",
            "blockdiag_linear",
            "short_conv",
            "recompute",
            "hyena_filter",
            "ops",
            "kernels",
            "emulator",
            "similarity",
            "embedding_precision",
        ],
    ),
    ("model", ["modeling_utils", "modeling_m2_bert"]),
    (
        "files and Hub",
        [
            "checkpoint_reader",
            "hub",
            "tokenization",
            "quantization",
            "weight_files",
            "loading",
            "model_card",
            "publishing",
        ],
    ),
    (
        "applications",
        [
            "pipelines",
            "encode",
            "distributed",
            "training",
            "conversion",
            "commands",
            "retrieval_evaluation",
            "cli",
            "__main__",
            "",
        ],
    ),
]


def _modules():
    """{module name: path} for every Python file of the installed package."""
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def _imports(name):
    """(imported module, line, name of the enclosing function or None) for each import of the package's modules."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    here = name if _is_package(name) else name.rpartition(".")[0]
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = here.rsplit(".", child.level - 1)[0] if child.level > 1 else here
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for target in targets:
                while target and target not in MODULES and target.startswith(PACKAGE):
                    target = target.rpartition(".")[0]
                if target in MODULES and target != name:
                    found.append((target, child.lineno, function))
            visit(child, inner)

    visit(tree, None)
    return found


def _layer(name):
    part = name[len(PACKAGE) + 1 :].split(".")[0] if name != PACKAGE else ""
    for index, (_, members) in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_architecture.py: add it where it belongs")


def _graph(with_hand_offs):
    return {
        name: {t for t, _, function in _imports(name) if with_hand_offs or function not in HAND_OFFS}
        for name in MODULES
    }


def _cycle(graph):
    """One import cycle of the graph as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_modules_are_found():
    assert {
        f"{PACKAGE}.modeling_m2_bert",
        f"{PACKAGE}.loading",
        f"{PACKAGE}.conversion.convert",
        f"{PACKAGE}.pipelines.fill_mask",
        f"{PACKAGE}.training.trainer",
    } <= set(MODULES)
    assert f"{PACKAGE}.loading" in {t for t, _, _ in _imports(f"{PACKAGE}.conversion.convert")}


def test_no_import_cycle():
    """Module-level and deferred imports alike; the hand-offs point back by design and are checked apart."""
    cycle = _cycle(_graph(with_hand_offs=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # The hand-offs are the only way back: with them, the model and its loader form a cycle.
    assert _cycle(_graph(with_hand_offs=True)) is not None


def test_the_hand_offs_are_thin():
    """Each hand-off method imports one function and returns its call: the work happens in the module above."""
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.FunctionDef)
                and node.name in HAND_OFFS
                and any(isinstance(n, ast.ImportFrom) for n in node.body)
            ):
                code = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
                assert len(code) == 2 and isinstance(code[0], ast.ImportFrom), f"{name}.{node.name}"


def test_every_import_points_to_its_layer_or_below():
    upward = [
        f"{name}:{line} imports {target} ({LAYERS[_layer(target)][0]} above {LAYERS[_layer(name)][0]})"
        for name in MODULES
        for target, line, function in _imports(name)
        if function not in HAND_OFFS and _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_deferred_imports_are_only_the_hand_offs():
    deferred = [
        f"{name}:{line} imports {target} inside {function}()"
        for name in MODULES
        for target, line, function in _imports(name)
        if function is not None and function not in HAND_OFFS
    ]
    assert not deferred, "\n".join(deferred)


def test_the_model_knows_nothing_of_files_hub_pipelines_or_training():
    io_and_above = {n for n in MODULES if _layer(n) >= 3}
    for model_module in ("modeling_m2_bert", "modeling_utils"):
        name = f"{PACKAGE}.{model_module}"
        reached = {t for t, _, function in _imports(name) if function not in HAND_OFFS}
        assert not reached & io_and_above, f"{name} imports {sorted(reached & io_and_above)}"


def test_quantization_and_weight_io_do_not_need_the_model_module():
    for module in ("quantization", "checkpoint_reader", "hub", "tokenization"):
        name = f"{PACKAGE}.{module}"
        assert f"{PACKAGE}.modeling_m2_bert" not in {t for t, _, _ in _imports(name)}, name


def test_no_module_imports_a_private_name_of_another():
    # A name shared across modules is public: one with a leading underscore is its own module's business.
    private = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
                private += [
                    f"{name}:{node.lineno} {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert not private, f"private names imported from another module: {private}"
