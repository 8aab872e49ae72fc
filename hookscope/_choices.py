"""Argument choices shared by the library and the command line (which must not import
torch to answer ``--help``): written once, here."""

#: patching directions: denoise (corrupted run, clean activations in) or noise
DIRECTIONS = ("denoise", "noise")
#: localize_circuit's screening methods
LOCALIZE_METHODS = ("attribution", "exact")
#: localize_circuit's circuit criteria
CRITERIA = ("patch", "faithfulness")
