"""Names the CLI's parser needs at start-up, kept free of heavy imports (no torch) so that
``adapedit --help`` and input errors answer at once."""

#: Built-in model names (``adapedit.pipelines.models.load_model``).
BUILTIN_MODELS = ("shapes", "tiny", "sd14-random")
#: The model the CLI and the demo use when none is named.
DEFAULT_MODEL = "shapes"
#: The demo's edit on the default model: a soft edit (position) the shapes world can check. The
#: attribute reader sees the source as its prompt says and the edit change the position alone,
#: at every seed tried (0–3); a small object, as in a size edit, is the model's weakest drawing
#: (a small circle reads as a triangle at every seed tried, 0–7).
DEMO_SOURCE = "a big red circle on the left"
DEMO_TARGET = "a big red circle on the right"
