;; Reads `secret.txt` from the first preopened directory (WASI fd 3). Answers
;; {"content":"<the file>"} or, when the sandbox refuses, {"error":"path_open errno NN"}
;; (no directory granted: errno 08, EBADF).
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "secret.txt")
  (data (i32.const 16) "{\22error\22:\22path_open errno 00\22}")
  (data (i32.const 64) "{\22content\22:\22")
  (func (export "alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "call") (param i32 i32) (result i64)
    (local $errno i32)
    (local $n i32)
    ;; path_open(dirfd 3, no symlink follow, "secret.txt", no oflags, rights fd_read, 0, 0, &fd at 200)
    (local.set $errno
      (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 0)
        (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200)))
    (if (local.get $errno)
      (then
        ;; the two errno digits go at offsets 42 and 43 of the error text
        (i32.store8 (i32.const 42) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
        (i32.store8 (i32.const 43) (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
        (return (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 30)))))
    ;; one read of up to 256 bytes into offset 76 (an iovec at 208, the count at 216)
    (i32.store (i32.const 208) (i32.const 76))
    (i32.store (i32.const 212) (i32.const 256))
    (drop (call $fd_read (i32.load (i32.const 200)) (i32.const 208) (i32.const 1) (i32.const 216)))
    (local.set $n (i32.load (i32.const 216)))
    (i32.store16 (i32.add (i32.const 76) (local.get $n)) (i32.const 0x7d22)) ;; "}  little-endian: '"' then '}'
    (i64.or (i64.shl (i64.const 64) (i64.const 32)) (i64.extend_i32_u (i32.add (local.get $n) (i32.const 14))))))
