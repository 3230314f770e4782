"""ConVis (Giulivi & Boracchi, IJCNN 2024): maps of WordNet concepts from the ranks of every
synset's definition over windows of the image, concept discovery and the OOD check.

`wordnet` finds WordNet 3.0, `nouns` reads its noun synsets, `hierarchy` builds a
vocabulary's hypernym hierarchy, `bank` embeds it, `windows` and `ranks` rank every synset
per window, `maps` turns ranks into maps, `ood` checks the hierarchy's zero-shot scores.
"""
