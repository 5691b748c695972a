;; Exports memory only: not the tool ABI (alloc and call are missing).
(module (memory (export "memory") 1))
