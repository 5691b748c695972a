;; A memory bomb: grows its memory 1 MiB at a time, forever; at the store's limit `memory.grow`
;; fails (-1) and the module traps.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "call") (param i32 i32) (result i64)
    (loop $more
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
      (br $more))
    (i64.const 0)))
