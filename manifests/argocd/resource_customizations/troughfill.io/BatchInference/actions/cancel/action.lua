-- In place: workers stop, finished results are merged, the rest is batch_cancelled. Final.
obj.spec.cancel = true
return obj
