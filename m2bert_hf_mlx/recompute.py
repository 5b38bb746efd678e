"""Fast forward passes that read weights only through values precomputed from them, with exact gradients.

At inference the long convolutions run from cached filter spectra, so the weights that made the spectra are not
inputs of the computation and autodiff alone would give them no gradient. `reference_vjp` makes such a fast
function differentiable in the module's weights by taking its VJP from a reference function that computes the
same values from the weights themselves.
"""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def reference_vjp(module, fast, reference, keys=None):
    """A function of the inputs that returns fast(*inputs) and is differentiated as reference(*inputs).

    Both compute the same values; `fast` may read the weights of `module` (those under the top-level `keys`, or
    all) only through precomputed values, while `reference` reads them from the module. The VJP runs `reference`
    with the module's weights replaced by the primals, so gradients reach the inputs and every weight.
    """
    parameters = module.parameters()
    if keys is not None:
        parameters = {key: parameters[key] for key in keys}
    names, weights = zip(*tree_flatten(parameters))

    def call(*inputs):
        count = len(inputs)

        @mx.custom_function
        def function(*primals):
            return fast(*primals[:count])

        @function.vjp
        def function_vjp(primals, cotangent, output):
            originals = module.parameters()

            def with_weights(*arrays):
                module.update(tree_unflatten(list(zip(names, arrays[count:]))))
                return reference(*arrays[:count])

            try:
                return mx.vjp(with_weights, list(primals), [cotangent])[1]
            finally:
                module.update(originals)

        return function(*inputs, *weights)

    return call
