;; The trivial tool of the ABI (README "Server-side tools"): `alloc(len) -> ptr` hands the host
;; room for the JSON arguments, `call(ptr, len) -> i64` returns (result_ptr << 32) | result_len.
;; This one answers {"echo": <the arguments>}.
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 0) "{\22echo\22:")
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (local.get $p))
  (func (export "call") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    ;; out = heap: the 8-byte prefix, the arguments, then "}"
    (local.set $out (global.get $heap))
    (memory.copy (local.get $out) (i32.const 0) (i32.const 8))
    (memory.copy (i32.add (local.get $out) (i32.const 8)) (local.get $ptr) (local.get $len))
    (i32.store8 (i32.add (local.get $out) (i32.add (local.get $len) (i32.const 8))) (i32.const 125))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
      (i64.extend_i32_u (i32.add (local.get $len) (i32.const 9))))))
