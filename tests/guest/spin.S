# Spinning loop for pause/kick tests: increments the dword at 0x600 forever (ds = 0).
    .code16
    .globl _start
_start:
1:  incl 0x600
    jmp  1b
