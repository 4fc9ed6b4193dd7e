"""Stand-ins for the demo, tests and benchmarks: synthetic cameras and bags, the demos.

Not needed by the product at run time.
"""
