"""The built-in benchmark suites: the text suites (:mod:`.text`) and the image suite (:mod:`.image`)."""
