from tests.node.conftest import node_factory  # noqa: F401 - fixture of the node tests
