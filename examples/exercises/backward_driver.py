"""Reference solution: the topological sort and the backward driver (docs/autograd.md, section 4).

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check backward_driver --dir examples/exercises
"""


class Node:
    """A scalar in a recorded graph: its value, the nodes it was computed from (`parents`),
    and the derivative of this node with respect to each parent (`local_grads`, one each).
    A leaf has no parents. `grad` starts at 0.0; backward fills it in.  (Given: keep it.)"""

    def __init__(self, value, parents=(), local_grads=()):
        self.value = value
        self.parents = tuple(parents)
        self.local_grads = tuple(local_grads)
        self.grad = 0.0


def mul(a, b):
    """a * b as a Node (given: to build graphs while you try things)."""
    return Node(a.value * b.value, (a, b), (b.value, a.value))


def add(a, b):
    """a + b as a Node (given)."""
    return Node(a.value + b.value, (a, b), (1.0, 1.0))


def topological_order(root):
    """Every node that `root` was computed from, directly or not, and root itself, each once
    and each after all of its parents (a list, root last).

    Without recursion: a chain of 3,000 nodes must work (Python's recursion limit is 1,000).
    A node can be reached along several paths (a diamond), or be listed twice as a parent
    (x * x).
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:  # every parent is already in the order
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node.parents if id(p) not in visited)
    return order


def backward(root):
    """Set root.grad = 1.0 and fill in node.grad = d root / d node for every node in
    topological_order(root), from the root back to the leaves. The grads start at 0.0."""
    root.grad = 1.0
    for node in reversed(topological_order(root)):
        for parent, local in zip(node.parents, node.local_grads):
            parent.grad += node.grad * local  # add: a node may feed several others
