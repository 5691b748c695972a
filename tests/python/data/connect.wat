;; A network connect attempt: imports a socket API (WasmEdge's `sock_open` / `sock_connect`).
;; The sandbox offers WASI preview 1 without sockets, so the module cannot be linked at all.
(module
  (import "wasi_snapshot_preview1" "sock_open" (func $sock_open (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_connect" (func $sock_connect (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "call") (param i32 i32) (result i64)
    ;; AF_INET stream socket, then connect to the address at 0 (port 80)
    (drop (call $sock_open (i32.const 1) (i32.const 1) (i32.const 300)))
    (drop (call $sock_connect (i32.load (i32.const 300)) (i32.const 0) (i32.const 80)))
    (i64.const 0)))
