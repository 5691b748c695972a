;; Not a module: the config check compiles each wasm tool and names what is wrong.
(module (func (result i32)))
