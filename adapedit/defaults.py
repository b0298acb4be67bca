"""Names the CLI's parser needs at start-up, kept free of heavy imports (no torch) so that
``adapedit --help`` and input errors answer at once."""

#: Built-in model names (``adapedit.pipelines.models.load_model``).
BUILTIN_MODELS = ("shapes", "tiny", "sd14-random")
#: The model the CLI and the demo use when none is named.
DEFAULT_MODEL = "shapes"
#: The demo's edit on the default model: a soft edit (size) the shapes world can check.
DEMO_SOURCE = "a small red circle on the left"
DEMO_TARGET = "a big red circle on the left"
