import os
import sys

# Test modules import shared helpers from one another (e.g. tiny models in test_scoring).
sys.path.insert(0, os.path.dirname(__file__))
