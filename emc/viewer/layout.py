"""Where the exported files go: the names the page and the server agree on."""

VIEWER_DIR = "viewer"  # default output directory, under the data directory
INDEX_FILE = "graph-metadata.json"  # the page's list of graphs
FEATURES_DIR = "features"  # features/<scan>/<feature id>.json
NEURONPEDIA_DIR = "neuronpedia"  # default output of `emc graph export --format neuronpedia`
