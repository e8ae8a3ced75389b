# Register computation: eax = ebx * ecx + edx; esi = eax ^ edi; then halt.
    .code16
    .globl _start
_start:
    mov  %ebx, %eax
    imul %ecx, %eax
    add  %edx, %eax
    mov  %eax, %esi
    xor  %edi, %esi
1:  hlt
    jmp  1b
