"""A trace's default targets and caps, declared once: TraceConfig's field defaults and the keyword defaults of the
steps that take them (sizing, per-prompt rankings, replacement circuits, build_graph) are these names. Kept apart
from config.py so the steps can import them without importing the command-line layer."""

FAITHFULNESS = 0.8  # default auto-sizing target
MAX_NODES = 1000  # default cap on the circuit's nodes (per prompt for per-prompt circuits)
KEEP_EDGE_INFLUENCE = 0.98  # default share of the total |weight| the kept edges carry
MIN_SHARE = 0.25  # per-prompt circuits: the graph shows the nodes kept by at least this share of the prompts
MAX_SHOWN_NODES = 400  # the most influential nodes a replacement graph's page and files show (--full-graph: all)
MAX_SHOWN_EDGES = 5000  # the strongest edges any page and files carry (--full-graph: all kept by influence)
