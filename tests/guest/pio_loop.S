# Port-I/O loop: `out %al, %dx` rcx times, with al = low byte of the remaining count (so a
# device can check the sequence), then halt. In: ecx = count (> 0), dx = port.
    .code16
    .globl _start
_start:
1:  mov  %cl, %al
    out  %al, %dx
    dec  %ecx
    jnz  1b
2:  hlt
    jmp  2b
