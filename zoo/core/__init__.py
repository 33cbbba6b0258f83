"""The math entries may use: softmax with masks, the multi-head shell, masks and padding, input
checks, kernelised sums, sorting and bucketing. Entries import from here and nothing else of the
package; nothing here imports an entry or the checking machinery."""
