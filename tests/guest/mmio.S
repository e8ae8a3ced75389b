# MMIO round trip through segment bx (base = bx * 16): eax = dword [0]; dword [4] = eax + 1;
# si = word [8]; byte [12] = low byte of si; then halt. In: bx = MMIO segment.
    .code16
    .globl _start
_start:
    mov  %bx, %ds
    mov  0, %eax
    mov  %eax, %ecx
    inc  %ecx
    mov  %ecx, 4
    mov  8, %si
    mov  %si, %ax
    mov  %al, 12
1:  hlt
    jmp  1b
